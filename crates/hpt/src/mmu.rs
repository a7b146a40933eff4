//! MMU model (in progress).
