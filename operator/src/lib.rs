//! wsgate-operator (work in progress).
