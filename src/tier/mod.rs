//! Storage tiers below the GPU: the host arena ([`host`], with the slot
//! table of a file-backed arena in [`slots`]) and the NVMe segment log
//! ([`nvme`]), each labelled with the model whose KV it holds ([`identity`]).

pub mod host;
pub mod identity;
pub mod nvme;
pub mod slots;
