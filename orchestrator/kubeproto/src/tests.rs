use serde_json::json;

use super::*;

/// A minimal protobuf writer for building test bodies.
#[derive(Default, Clone)]
struct Enc(Vec<u8>);

impl Enc {
    fn varint(mut self, mut v: u64) -> Self {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return self;
            }
            self.0.push(byte | 0x80);
        }
    }
    fn key(self, tag: u32, wire: u8) -> Self {
        self.varint(u64::from(tag) << 3 | u64::from(wire))
    }
    fn int(self, tag: u32, v: i64) -> Self {
        self.key(tag, 0).varint(v as u64)
    }
    fn bytes(self, tag: u32, b: &[u8]) -> Self {
        let mut e = self.key(tag, 2).varint(b.len() as u64);
        e.0.extend_from_slice(b);
        e
    }
    fn str(self, tag: u32, s: &str) -> Self {
        self.bytes(tag, s.as_bytes())
    }
    fn msg(self, tag: u32, m: Enc) -> Self {
        self.bytes(tag, &m.0)
    }
    fn entry(self, tag: u32, k: &str, v: Enc) -> Self {
        self.msg(tag, Enc::default().str(1, k).msg(2, v))
    }
    fn str_entry(self, tag: u32, k: &str, v: &str) -> Self {
        self.msg(tag, Enc::default().str(1, k).str(2, v))
    }
}

fn e() -> Enc {
    Enc::default()
}

fn body(api_version: &str, kind: &str, raw: Enc) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let unknown = e()
        .msg(1, e().str(1, api_version).str(2, kind))
        .bytes(2, &raw.0)
        .str(3, "")
        .str(4, "");
    out.extend(unknown.0);
    out
}

/// Properties with irregular casing, as the OpenAPI documents spell them.
struct Names;

impl JsonNames for Names {
    fn properties(&self, definition: &str) -> Option<Vec<String>> {
        let props: &[&str] = match definition {
            "io.k8s.api.core.v1.PodSpec" => &["hostIPC", "containers", "restartPolicy"],
            "io.k8s.api.core.v1.ServiceSpec" => &["clusterIP", "ports", "type"],
            "io.k8s.api.core.v1.AWSElasticBlockStoreVolumeSource" => &["volumeID", "fsType"],
            _ => return None,
        };
        Some(props.iter().map(|s| s.to_string()).collect())
    }
}

fn meta(name: &str) -> Enc {
    // Like Go's encoder: every non-pointer field present, zero Time empty.
    e().str(1, name)
        .str(2, "")
        .str(3, "default")
        .str(4, "")
        .str(5, "")
        .str(6, "")
        .int(7, 0)
        .msg(8, e())
}

#[test]
fn configmap() {
    let raw = e()
        .msg(1, meta("cm").str_entry(11, "app", "web"))
        .str_entry(2, "a", "1")
        .str_entry(2, "empty", "")
        .entry(3, "bin", e());
    let got = decode(&body("v1", "ConfigMap", raw), &Names).unwrap();
    assert_eq!(
        got,
        json!({
            "kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": "cm", "namespace": "default",
                         "creationTimestamp": null, "labels": {"app": "web"}},
            "data": {"a": "1", "empty": ""},
            "binaryData": {"bin": ""},
        })
    );
}

#[test]
fn secret_bytes_are_base64() {
    let raw = e()
        .msg(1, meta("s"))
        .msg(2, e().str(1, "password").bytes(2, b"hunter2\xff"))
        .str(3, "Opaque");
    let got = decode(&body("v1", "Secret", raw), &CamelCaseNames).unwrap();
    assert_eq!(got["data"], json!({"password": "aHVudGVyMv8="}));
    assert_eq!(got["type"], "Opaque");
}

#[test]
fn deployment_zero_replicas_and_casing() {
    let container = e()
        .str(1, "web")
        .str(2, "busybox")
        .msg(6, e().int(3, 80).str(4, "TCP"))
        .msg(
            8,
            e().entry(1, "cpu", e().str(1, "500m"))
                .entry(2, "memory", e().str(1, "128Mi")),
        );
    let pod_spec = e()
        .msg(2, container)
        .str(3, "")
        .int(13, 1) // hostIPC
        .int(4, 30);
    let spec = e()
        .int(1, 0)
        .msg(2, e().str_entry(1, "app", "web"))
        .msg(3, e().msg(1, meta("")).msg(2, pod_spec));
    let raw = e().msg(1, meta("web")).msg(2, spec);
    let got = decode(&body("apps/v1", "Deployment", raw), &Names).unwrap();
    assert_eq!(got["spec"]["replicas"], 0);
    assert_eq!(
        got["spec"]["selector"],
        json!({"matchLabels": {"app": "web"}})
    );
    let pod = &got["spec"]["template"]["spec"];
    assert_eq!(pod["hostIPC"], true);
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert!(
        pod.get("restartPolicy").is_none(),
        "empty strings are unset"
    );
    assert_eq!(
        pod["containers"],
        json!([{
            "name": "web", "image": "busybox",
            "ports": [{"containerPort": 80, "protocol": "TCP"}],
            "resources": {"limits": {"cpu": "500m"}, "requests": {"memory": "128Mi"}},
        }])
    );
}

#[test]
fn service_int_or_string() {
    let port = |name: &str, target: Enc| e().str(1, name).str(2, "TCP").int(3, 80).msg(4, target);
    let spec = e()
        .msg(1, port("a", e().int(1, 0).int(2, 8080).str(3, "")))
        .msg(1, port("b", e().int(1, 1).int(2, 0).str(3, "http")))
        .str(3, "10.0.0.1");
    let raw = e().msg(1, meta("s")).msg(2, spec);
    let got = decode(&body("v1", "Service", raw), &Names).unwrap();
    let ports = &got["spec"]["ports"];
    assert_eq!(ports[0]["targetPort"], 8080);
    assert_eq!(ports[1]["targetPort"], "http");
    assert_eq!(got["spec"]["clusterIP"], "10.0.0.1");
}

#[test]
fn volume_id_casing() {
    let source = e().str(1, "vol-1").str(2, "ext4");
    let pod_spec = e().msg(1, e().str(1, "data").msg(2, e().msg(4, source)));
    let raw = e().msg(1, meta("p")).msg(2, pod_spec);
    let got = decode(&body("v1", "Pod", raw), &Names).unwrap();
    assert_eq!(
        got["spec"]["volumes"][0]["awsElasticBlockStore"],
        json!({"volumeID": "vol-1", "fsType": "ext4"})
    );
}

#[test]
fn times_and_durations() {
    // 2024-01-02T03:04:05Z
    let t = e().int(1, 1_704_164_645).int(2, 123_456_789);
    let lease = e()
        .str(1, "holder")
        .int(2, 15)
        .msg(3, t.clone())
        .msg(4, t.clone());
    let raw = e().msg(1, meta("l").msg(8, t.clone())).msg(2, lease);
    let got = decode(&body("coordination.k8s.io/v1", "Lease", raw), &Names).unwrap();
    assert_eq!(got["metadata"]["creationTimestamp"], "2024-01-02T03:04:05Z");
    assert_eq!(got["spec"]["acquireTime"], "2024-01-02T03:04:05.123456Z");

    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
    assert_eq!(go_duration(90_000_000_000), "1m30s");
    assert_eq!(go_duration(1_500_000_000), "1.5s");
    assert_eq!(go_duration(300_000_000), "300ms");
    assert_eq!(go_duration(1_500), "1.5µs");
    assert_eq!(go_duration(-5), "-5ns");
    assert_eq!(go_duration(i64::MIN), "-2562047h47m16.854775808s");
}

#[test]
fn raw_extension_and_packed() {
    let raw = e()
        .msg(1, meta("rev"))
        .msg(2, e().bytes(1, br#"{"spec":{"x":[1,2]}}"#))
        .int(3, 7);
    let got = decode(&body("apps/v1", "ControllerRevision", raw), &Names).unwrap();
    assert_eq!(got["data"], json!({"spec": {"x": [1, 2]}}));
    assert_eq!(got["revision"], 7);

    // Repeated int32 both unpacked and packed (-1 is ten bytes).
    let packed = e().varint(3).varint(u64::MAX).varint(2);
    let codes = e().str(2, "In").int(3, 1).bytes(3, &packed.0);
    let rule = e().str(1, "FailJob").msg(2, codes);
    let raw = e().msg(1, meta("j")).msg(2, e().msg(11, e().msg(1, rule)));
    let got = decode(&body("batch/v1", "Job", raw), &Names).unwrap();
    assert_eq!(
        got["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"],
        json!({"operator": "In", "values": [1, 3, -1, 2]})
    );
}

#[test]
fn meta_kinds_under_any_group() {
    let raw = e().int(1, 0).str(4, "Foreground");
    let got = decode(&body("apps/v1", "DeleteOptions", raw), &Names).unwrap();
    assert_eq!(got["propagationPolicy"], "Foreground");
    assert_eq!(got["gracePeriodSeconds"], 0);
}

#[test]
fn errors() {
    let ok = body("v1", "ConfigMap", e().msg(1, meta("cm")));
    assert_eq!(decode(b"{}", &Names), Err(DecodeError::MissingMagic));
    assert_eq!(
        decode(&body("v1", "Nope", e()), &Names),
        Err(DecodeError::UnknownKind {
            api_version: "v1".into(),
            kind: "Nope".into()
        })
    );
    assert_eq!(
        decode(&body("", "", e()), &Names),
        Err(DecodeError::MissingTypeMeta)
    );
    // Every truncation fails cleanly.
    for n in 4..ok.len() {
        let _ = decode(&ok[..n], &Names);
    }
    assert_eq!(
        decode(&ok[..ok.len() - 1], &Names),
        Err(DecodeError::Truncated)
    );
    let mut overlong = MAGIC.to_vec();
    overlong.extend([0x80; 11]);
    assert_eq!(decode(&overlong, &Names), Err(DecodeError::VarintOverflow));
    let wrong = body("v1", "ConfigMap", e().int(1, 5));
    assert!(matches!(
        decode(&wrong, &Names),
        Err(DecodeError::WrongWireType { .. })
    ));
    let utf8 = body("v1", "ConfigMap", e().msg(1, e().bytes(1, b"\xff")));
    assert!(matches!(
        decode(&utf8, &Names),
        Err(DecodeError::InvalidUtf8 { .. })
    ));
    let group = body("v1", "ConfigMap", e().key(99, 3));
    assert_eq!(decode(&group, &Names), Err(DecodeError::InvalidWireType(3)));
}

#[test]
fn depth_limit() {
    // Each level is a ControllerRevision whose data embeds another protobuf
    // body, so nesting also passes through the envelope.
    let mut inner = body("apps/v1", "ControllerRevision", e());
    for _ in 0..200 {
        inner = body(
            "apps/v1",
            "ControllerRevision",
            e().msg(2, e().bytes(1, &inner)),
        );
    }
    assert_eq!(decode(&inner, &Names), Err(DecodeError::TooDeep));
}

#[test]
fn fuzz_does_not_panic() {
    // Deterministic pseudo-random mutations of a valid body.
    let base = body(
        "apps/v1",
        "Deployment",
        e().msg(1, meta("web")).msg(
            2,
            e().int(1, 3)
                .msg(3, e().msg(2, e().msg(2, e().str(1, "c")))),
        ),
    );
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = 4 + (next() as usize) % (b.len() - 4);
            b[i] = next() as u8;
        }
        let _ = decode(&b, &Names);
    }
}

#[test]
fn table_is_consistent() {
    let s = schema();
    assert!(s.messages.len() > 1000);
    for (name, msg) in &s.messages {
        for field in msg.fields.values() {
            let kinds = match field.shape {
                Shape::One(k, _) | Shape::Repeated(k) => [Some(k), None],
                Shape::Inline(m) => [Some(Kind::Message(m)), None],
                Shape::Map(_, v) => [Some(v), None],
            };
            for kind in kinds.into_iter().flatten() {
                if let Kind::Message(m) = kind {
                    assert!(s.messages.contains_key(m), "{name}.{}: {m}", field.snake);
                }
            }
        }
    }
    for package in s.packages.values() {
        assert!(
            s.messages.keys().any(|m| m.starts_with(package)),
            "{package}"
        );
    }
    assert!(s
        .messages
        .contains_key("k8s.io.api.core.v1.AWSElasticBlockStoreVolumeSource"));
}

#[test]
fn crd_schema_types() {
    const P: &str = "k8s.io.apiextensions_apiserver.pkg.apis.apiextensions.v1";
    let s = schema();
    let tag = |message: &str, snake: &str| {
        let m = &s.messages[format!("{P}.{message}").as_str()];
        *m.fields.iter().find(|(_, f)| f.snake == snake).unwrap().0
    };
    let props = |t: &str| e().str(tag("JSONSchemaProps", "type"), t);
    let schema_props = e()
        .str(tag("JSONSchemaProps", "type"), "object")
        .msg(
            tag("JSONSchemaProps", "default"),
            e().bytes(1, br#"{"a":1}"#),
        )
        .msg(tag("JSONSchemaProps", "items"), e().msg(1, props("string")))
        .msg(
            tag("JSONSchemaProps", "additional_properties"),
            e().int(1, 1),
        )
        .msg(tag("JSONSchemaProps", "not"), props("integer"));
    let validation = e().msg(1, schema_props);
    let version = e()
        .str(1, "v1")
        .msg(tag("CustomResourceDefinitionVersion", "schema"), validation);
    let spec = e()
        .str(1, "example.com")
        .msg(tag("CustomResourceDefinitionSpec", "versions"), version);
    let raw = e().msg(1, meta("crd")).msg(2, spec);
    let got = decode(
        &body("apiextensions.k8s.io/v1", "CustomResourceDefinition", raw),
        &Names,
    )
    .unwrap();
    let schema = &got["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["default"], json!({"a": 1}));
    assert_eq!(schema["items"], json!({"type": "string"}));
    assert_eq!(schema["additionalProperties"], true);
    assert_eq!(schema["not"], json!({"type": "integer"}));

    // Unbounded recursion through `not` stops at the depth limit.
    let mut deep = props("x");
    for _ in 0..(MAX_DEPTH + 10) {
        deep = e().msg(tag("JSONSchemaProps", "not"), deep);
    }
    let validation = e().msg(1, deep);
    let version = e().msg(tag("CustomResourceDefinitionVersion", "schema"), validation);
    let raw = e().msg(
        2,
        e().msg(tag("CustomResourceDefinitionSpec", "versions"), version),
    );
    let got = decode(
        &body("apiextensions.k8s.io/v1", "CustomResourceDefinition", raw),
        &Names,
    );
    assert_eq!(got, Err(DecodeError::TooDeep));
}
