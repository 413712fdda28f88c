//! socketcand's ASCII protocol.
