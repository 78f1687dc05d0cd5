//! Mapping of bitnet.cpp graph nodes onto canonical stages.
