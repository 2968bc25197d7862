//! DataWarp tools (being written).
