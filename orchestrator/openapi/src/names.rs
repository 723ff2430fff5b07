//! Property names for decoding Kubernetes' protobuf encoding: the proto
//! field names lose the casing of JSON names such as `volumeID` or `podIP`,
//! which the definitions restore.

use tapestry_kubeproto::JsonNames;

use crate::OpenApi;

impl JsonNames for OpenApi {
    fn properties(&self, definition: &str) -> Option<Vec<String>> {
        self.fields.properties(definition)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tapestry_kubeproto::{decode, JsonNames};

    use crate::tests::served;
    use crate::OpenApi;

    fn openapi() -> OpenApi {
        OpenApi::new(&served()).expect("builds")
    }

    /// A length-delimited protobuf field.
    fn ld(tag: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![tag << 3 | 2, u8::try_from(bytes.len()).unwrap()];
        out.extend_from_slice(bytes);
        out
    }

    fn body(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [ld(1, api_version.as_bytes()), ld(2, kind.as_bytes())].concat();
        [b"k8s\0".to_vec(), ld(1, &type_meta), ld(2, raw)].concat()
    }

    #[test]
    fn properties_keep_exact_casing() {
        let api = openapi();
        let spec = api.properties("io.k8s.api.core.v1.ServiceSpec").unwrap();
        assert!(spec.iter().any(|p| p == "clusterIP"));
        let pod = api.properties("io.k8s.api.core.v1.PodSpec").unwrap();
        assert!(pod.iter().any(|p| p == "hostIPC"));
        assert!(api.properties("io.k8s.api.core.v1.Nope").is_none());
    }

    #[test]
    fn decodes_with_openapi_names() {
        let api = openapi();
        // Service{spec: {clusterIP: "10.0.0.1"}}
        let service = body("v1", "Service", &ld(2, &ld(3, b"10.0.0.1")));
        let got = decode(&service, &api).unwrap();
        assert_eq!(got["spec"], json!({"clusterIP": "10.0.0.1"}));
        // Pod{spec: {volumes: [{name: "d", awsElasticBlockStore: {volumeID: "v-1"}}]}}
        let aws = ld(4, &ld(1, b"v-1"));
        let volume = [ld(1, b"d"), ld(2, &aws)].concat();
        let pod = body("v1", "Pod", &ld(2, &ld(1, &volume)));
        let got = decode(&pod, &api).unwrap();
        assert_eq!(
            got["spec"]["volumes"],
            json!([{"name": "d", "awsElasticBlockStore": {"volumeID": "v-1"}}])
        );
    }

    #[test]
    fn kubectl_bodies() {
        let api = openapi();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kubeproto/tests/data");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            let got = decode(&std::fs::read(&path).unwrap(), &api).unwrap();
            let want: Value =
                serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap())
                    .unwrap();
            assert_eq!(got, want, "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 7);
    }
}
