//! Custom resources end to end through the in-process API: a CRD is
//! served at once, its objects are pruned, defaulted and validated, its
//! subresources and columns work, and deleting it removes its objects.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::testing::{start, TestServer};

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const WIDGETS: &str = "/apis/example.com/v1/namespaces/default/widgets";

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [
                {"name": "v1beta1", "served": true, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
                {"name": "v1", "served": true, "storage": true,
                 "subresources": {"status": {}, "scale": {
                     "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}},
                 "additionalPrinterColumns": [
                     {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                     {"name": "Color", "type": "string", "jsonPath": ".spec.color"}],
                 "selectableFields": [{"jsonPath": ".spec.color"}],
                 "schema": {"openAPIV3Schema": {
                     "type": "object",
                     "properties": {
                         "spec": {"type": "object", "required": ["color"], "properties": {
                             "replicas": {"type": "integer", "minimum": 0, "maximum": 10},
                             "color": {"type": "string", "enum": ["red", "green"]},
                             "size": {"type": "string", "default": "M"},
                             "name": {"type": "string", "pattern": "^[a-z]+$"}}},
                         "status": {"type": "object", "properties": {
                             "replicas": {"type": "integer"},
                             "selector": {"type": "string"}}}}}}}
            ]
        }
    })
}

async fn established(server: &TestServer, name: &str) -> Value {
    let started = Instant::now();
    loop {
        let crd = server
            .send("GET", &format!("{CRDS}/{name}"), &Value::Null)
            .await;
        let ok = crd["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        if ok {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "established after {:?}",
                started.elapsed()
            );
            return crd;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not established: {crd}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_is_served_with_its_schema_subresources_and_columns() {
    let server = start().await;
    server.send("POST", CRDS, &widget_crd()).await;
    let crd = established(&server, "widgets.example.com").await;
    assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");
    assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));

    let discovery = server
        .send("GET", "/apis/example.com/v1", &Value::Null)
        .await;
    let names: Vec<&str> = discovery["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["widgets", "widgets/status", "widgets/scale"]);
    let group = server.send("GET", "/apis/example.com", &Value::Null).await;
    assert_eq!(group["preferredVersion"]["version"], "v1");

    // Pruned, defaulted, warned about.
    let (code, headers, created) = server
        .raw(
            "POST",
            WIDGETS,
            "application/json",
            "",
            json!({"metadata": {"name": "a"}, "spec": {"replicas": 2, "color": "red", "bogus": 1},
                   "status": {"replicas": 9}})
            .to_string(),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["spec"],
        json!({"replicas": 2, "color": "red", "size": "M"})
    );
    assert!(
        created.get("status").is_none(),
        "status is set through its subresource: {created}"
    );
    assert_eq!(created["metadata"]["generation"], 1);
    let warning = headers
        .get("warning")
        .and_then(|w| w.to_str().ok())
        .unwrap_or("");
    assert!(
        warning.contains("unknown field \\\"spec.bogus\\\""),
        "{warning}"
    );

    // Invalid objects name the field.
    for (spec, message) in [
        (json!({"color": "pink"}), "spec.color: Unsupported value: \"pink\": supported values: \"red\", \"green\""),
        (json!({"color": "red", "replicas": "x"}), "spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\""),
        (json!({"color": "red", "replicas": 20}), "spec.replicas: Invalid value: 20: spec.replicas in body should be less than or equal to 10"),
        (json!({"color": "red", "name": "ABC"}), "spec.name: Invalid value: \"ABC\": spec.name in body should match '^[a-z]+$'"),
        (json!({}), "spec.color: Required value"),
    ] {
        let (code, answer) = server.request("POST", WIDGETS, &json!({"metadata": {"name": "bad"}, "spec": spec})).await;
        assert_eq!(code, 422, "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(message), "{message}\n{answer}");
    }
    let (code, answer) = server
        .request(
            "POST",
            WIDGETS,
            &json!({"metadata": {"name": "strict"}, "spec": {"color": "red", "x": 1}}),
        )
        .await;
    assert_eq!(code, 201, "{answer}");
    let (code, _, answer) = server
        .raw(
            "POST",
            &format!("{WIDGETS}?fieldValidation=Strict"),
            "application/json",
            "",
            json!({"metadata": {"name": "strict2"}, "spec": {"color": "red", "x": 1}}).to_string(),
        )
        .await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"spec.x\""),
        "{answer}"
    );

    // Status and scale.
    let status = server
        .send(
            "PATCH",
            &format!("{WIDGETS}/a/status"),
            &json!({"spec": {"replicas": 7}, "status": {"replicas": 2, "selector": "app=a"}}),
        )
        .await;
    assert_eq!(status["status"]["replicas"], 2);
    assert_eq!(
        status["spec"]["replicas"], 2,
        "a status write leaves spec alone"
    );
    assert_eq!(status["metadata"]["generation"], 1);
    let scale = server
        .send("GET", &format!("{WIDGETS}/a/scale"), &Value::Null)
        .await;
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=a");
    let scaled = server
        .send(
            "PATCH",
            &format!("{WIDGETS}/a/scale"),
            &json!({"spec": {"replicas": 5}}),
        )
        .await;
    assert_eq!(scaled["spec"]["replicas"], 5);
    let widget = server
        .send("GET", &format!("{WIDGETS}/a"), &Value::Null)
        .await;
    assert_eq!(widget["spec"]["replicas"], 5);
    assert_eq!(widget["metadata"]["generation"], 2);

    // Another served version reads the same object.
    let beta = server
        .send(
            "GET",
            "/apis/example.com/v1beta1/namespaces/default/widgets/a",
            &Value::Null,
        )
        .await;
    assert_eq!(beta["apiVersion"], "example.com/v1beta1");
    assert_eq!(beta["spec"]["replicas"], 5);

    // Columns and selectable fields.
    let (code, _, table) = server
        .raw(
            "GET",
            &format!("{WIDGETS}?fieldSelector=spec.color%3Dred"),
            "application/json",
            "application/json;as=Table;v=v1;g=meta.k8s.io",
            String::new(),
        )
        .await;
    assert_eq!(code, 200, "{table}");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Name", "Replicas", "Color"]);
    assert_eq!(table["rows"][0]["cells"], json!(["a", 5, "red"]));

    // Strategic merge patches are not for custom resources.
    let (code, _, answer) = server
        .raw(
            "PATCH",
            &format!("{WIDGETS}/a"),
            "application/strategic-merge-patch+json",
            "",
            json!({"spec": {"replicas": 1}}).to_string(),
        )
        .await;
    assert_eq!(code, 415, "{answer}");

    // Deleting the CRD deletes its objects and its endpoints.
    server
        .send(
            "DELETE",
            &format!("{CRDS}/widgets.example.com"),
            &Value::Null,
        )
        .await;
    let started = Instant::now();
    loop {
        let (code, _) = server
            .request("GET", &format!("{CRDS}/widgets.example.com"), &Value::Null)
            .await;
        if code == 404 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "CRD still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = server
        .request("GET", "/apis/example.com/v1", &Value::Null)
        .await;
    assert_eq!(code, 404);
    let left = server.api_store_keys("/registry/example.com/").await;
    assert!(left.is_empty(), "{left:?}");
}

async fn condition(server: &TestServer, name: &str, kind: &str) -> Value {
    let started = Instant::now();
    loop {
        let crd = server
            .send("GET", &format!("{CRDS}/{name}"), &Value::Null)
            .await;
        let found = crd["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned());
        if let Some(c) = found {
            return c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no {kind} condition: {crd}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CRD whose names another kind of its group already uses is not
/// served, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_names_are_refused_with_a_reason() {
    let server = start().await;
    server.send("POST", CRDS, &widget_crd()).await;
    established(&server, "widgets.example.com").await;
    let mut gadgets = widget_crd();
    gadgets["metadata"]["name"] = json!("gadgets.example.com");
    gadgets["spec"]["names"] = json!({"plural": "gadgets", "kind": "Gadget", "shortNames": ["wd"]});
    server.send("POST", CRDS, &gadgets).await;
    let accepted = condition(&server, "gadgets.example.com", "NamesAccepted").await;
    assert_eq!(accepted["status"], "False", "{accepted}");
    assert_eq!(accepted["reason"], "ShortNamesConflict");
    assert_eq!(accepted["message"], "\"wd\" is already in use");
    let established = condition(&server, "gadgets.example.com", "Established").await;
    assert_eq!(established["status"], "False");
    let (code, _) = server
        .request(
            "GET",
            "/apis/example.com/v1/namespaces/default/gadgets",
            &Value::Null,
        )
        .await;
    assert_eq!(code, 404);

    // A built-in kind's names are taken too (a protected group needs the
    // approval annotation first).
    let leases = json!({
        "metadata": {"name": "leases.coordination.k8s.io",
                     "annotations": {"api-approved.kubernetes.io": "unapproved, testing only"}},
        "spec": {"group": "coordination.k8s.io", "scope": "Namespaced",
                 "names": {"plural": "leases", "kind": "MyLease"},
                 "versions": [{"name": "v2", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
    server.send("POST", CRDS, &leases).await;
    let accepted = condition(&server, "leases.coordination.k8s.io", "NamesAccepted").await;
    assert_eq!(accepted["reason"], "PluralConflict", "{accepted}");
    let mut unapproved = leases.clone();
    unapproved["metadata"] = json!({"name": "leases.coordination.k8s.io"});
    let (code, answer) = server.request("POST", CRDS, &unapproved).await;
    assert_eq!(code, 422, "{answer}");
}

/// Scale writes go through the kind's validation; a Scale must carry an
/// int32 count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_writes_are_validated_by_the_schema() {
    let server = start().await;
    server.send("POST", CRDS, &widget_crd()).await;
    established(&server, "widgets.example.com").await;
    server
        .send(
            "POST",
            WIDGETS,
            &json!({"metadata": {"name": "a"}, "spec": {"color": "red", "replicas": 1}}),
        )
        .await;
    let scale = format!("{WIDGETS}/a/scale");
    let (code, answer) = server
        .request("PATCH", &scale, &json!({"spec": {"replicas": 20}}))
        .await;
    assert_eq!(code, 422, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("should be less than or equal to 10"),
        "{answer}"
    );
    let (code, answer) = server
        .request("PATCH", &scale, &json!({"spec": {"replicas": "abc"}}))
        .await;
    assert_eq!(code, 400, "{answer}");
    let widget = server
        .send("GET", &format!("{WIDGETS}/a"), &Value::Null)
        .await;
    assert_eq!(widget["spec"]["replicas"], 1, "nothing changed: {widget}");
}

/// Objects are read through the schema the CRD has now: a field it no
/// longer declares is pruned (and so does not break a strict patch), and
/// a default it gained is applied; watches of the old definition end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_current_schema() {
    let server = start().await;
    let mut crd = widget_crd();
    server.send("POST", CRDS, &crd).await;
    established(&server, "widgets.example.com").await;
    server
        .send(
            "POST",
            WIDGETS,
            &json!({"metadata": {"name": "a"}, "spec": {"color": "red", "name": "old"}}),
        )
        .await;
    let watch = {
        let req = http::Request::builder()
            .uri(format!("{WIDGETS}?watch=1"))
            .body(axum::body::Body::empty())
            .expect("request");
        tower::ServiceExt::oneshot(server.api.clone(), req)
            .await
            .expect("watch")
            .into_body()
    };
    let props = &mut crd["spec"]["versions"][1]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    props.as_object_mut().unwrap().remove("name");
    props["tier"] = json!({"type": "string", "default": "gold"});
    server
        .send("PUT", &format!("{CRDS}/widgets.example.com"), &crd)
        .await;
    // The old definition's watch ends; the new schema is in force.
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(watch),
    )
    .await;
    assert!(ended.is_ok(), "the watch of the old definition did not end");
    let started = Instant::now();
    loop {
        let widget = server
            .send("GET", &format!("{WIDGETS}/a"), &Value::Null)
            .await;
        if widget["spec"].get("name").is_none() {
            assert_eq!(widget["spec"]["tier"], "gold", "{widget}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still read by the old schema: {widget}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, answer) = server
        .raw(
            "PATCH",
            &format!("{WIDGETS}/a?fieldValidation=Strict"),
            "application/merge-patch+json",
            "",
            json!({"spec": {"color": "green"}}).to_string(),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
}
