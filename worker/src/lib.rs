//! Warpline worker library (being written).
