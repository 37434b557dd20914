//! Host tier: one arena of fixed-size slots (in progress).
