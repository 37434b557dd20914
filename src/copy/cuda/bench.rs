//! Self-test and benchmark (filled in below).
