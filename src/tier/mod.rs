//! Storage tiers below the GPU: the host arena ([`host`]) and the NVMe
//! segment log ([`nvme`]).

pub mod host;
pub mod nvme;
