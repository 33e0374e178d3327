//! Node setup shared by the CNI plugin, the resolver daemon and the installer.
