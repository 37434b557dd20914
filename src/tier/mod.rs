//! Storage tiers below the GPU: the host arena ([`host`], with the slot
//! table of a file-backed arena in [`slots`]) and the NVMe segment log
//! ([`nvme`]).

pub mod host;
pub mod nvme;
pub mod slots;
