//! VXLAN export: each packet as the inner frame of a VXLAN datagram to a
//! UDP endpoint, so a sensor (Suricata, Zeek) can read it on an interface.
pub mod config;
pub mod sink;
