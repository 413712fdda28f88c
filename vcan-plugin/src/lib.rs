//! vcan-plugin library
