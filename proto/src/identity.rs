//! How a tap's client certificate names it to the aggregator: subject CN
//! `tapestry:tap:NODE`, organisation `tapestry:taps`. The node in the name
//! is the only node whose pods that tap may speak for.

/// The CN prefix of a tap identity.
pub const TAP_USER_PREFIX: &str = "tapestry:tap:";

/// The organisation (group) of every tap identity.
pub const TAPS_GROUP: &str = "tapestry:taps";

/// The identity of the tap on `node`.
pub fn tap_user(node: &str) -> String {
    format!("{TAP_USER_PREFIX}{node}")
}

/// The node a tap identity names, if `user` is one.
pub fn tap_node(user: &str) -> Option<&str> {
    user.strip_prefix(TAP_USER_PREFIX).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_identity_names_its_node() {
        assert_eq!(tap_node(&tap_user("node-1")), Some("node-1"));
        assert_eq!(tap_node("tapestry:tap:"), None);
        assert_eq!(tap_node("system:node:node-1"), None);
    }
}
