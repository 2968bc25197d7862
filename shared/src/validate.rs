//! Deterministic validators (being written).
