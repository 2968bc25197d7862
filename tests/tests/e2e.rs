//! End-to-end suites (being written).
