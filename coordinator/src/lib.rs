//! Warpline coordinator library (being written).
