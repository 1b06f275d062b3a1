//! wsgate
