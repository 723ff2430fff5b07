//! Bearer tokens in kube-apiserver's `--token-auth-file` format: one
//! `token,user,uid[,"group1,group2"]` line each; blank lines and `#`
//! comments are skipped. One reader for every component that takes such a
//! file (the API server, the fleet manager).

use std::collections::HashMap;

/// Who a bearer token belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// What else the authenticator knows (a service account token's pod
    /// and node, under `authentication.kubernetes.io/...`).
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// The tokens of one file.
#[derive(Clone, Debug, Default)]
pub struct TokenFile {
    by_token: HashMap<String, User>,
}

impl TokenFile {
    /// Parse a file's text; an error names the line that is wrong.
    pub fn parse(text: &str) -> Result<TokenFile, String> {
        let mut by_token = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line);
            if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
                return Err(format!(
                    "line {}: expected token,user,uid[,\"groups\"]",
                    n + 1
                ));
            }
            let groups = fields
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            by_token.insert(
                fields[0].clone(),
                User {
                    name: fields[1].clone(),
                    uid: fields[2].clone(),
                    groups,
                    extra: Default::default(),
                },
            );
        }
        Ok(TokenFile { by_token })
    }

    pub fn authenticate(&self, token: &str) -> Option<&User> {
        self.by_token.get(token)
    }

    /// Every (token, user) pair.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &User)> {
        self.by_token.iter()
    }
}

/// Whether two secrets are equal, in time that depends only on their
/// length (a byte-by-byte early exit would tell an attacker how much of a
/// guess was right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// CSV fields of one line, `"`-quoted fields allowed to hold commas.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    fields.push(current);
    fields.into_iter().map(|f| f.trim().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_users_with_groups() {
        let file = TokenFile::parse("# who may call\n\nt1,alice,u1,\"ops,dev\"\nt2,bob,u2\n")
            .expect("parses");
        let alice = file.authenticate("t1").expect("alice");
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["ops", "dev"]);
        assert!(file.authenticate("t2").expect("bob").groups.is_empty());
        assert!(file.authenticate("nope").is_none());
        assert_eq!(
            TokenFile::parse("t3,carol").unwrap_err(),
            "line 1: expected token,user,uid[,\"groups\"]"
        );
    }
}
