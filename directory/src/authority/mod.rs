//! The directory-authority role.
