//! PCAP-over-IP: a TCP listener that streams classic pcap to every client
//! (`tshark -i TCP@HOST:PORT`, Arkime, NetworkMiner).
pub mod config;
pub mod sink;
