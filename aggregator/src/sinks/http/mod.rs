//! HTTP streaming: `GET /v1/tools/NAME/pcap` on the aggregator's HTTP
//! listener streams classic pcap (`curl -N … | tshark -r -`).
pub mod config;
