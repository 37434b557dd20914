//! NVMe tier: log-structured segment files (in progress).
