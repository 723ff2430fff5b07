//! Acknowledged writes survive SIGKILL; watches resume across restarts and
//! report compaction as 410 Gone. Driven by kube-rs, a real Kubernetes client.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{require_kubectl, Server};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

async fn client(s: &Server) -> Client {
    let kubeconfig = Kubeconfig::read_from(s.kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

fn configmap(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("value".to_string(), value.to_string())])),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_creates_survive_sigkill() {
    if !require_kubectl() {
        return;
    }
    let mut s = Server::start();
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut writers = Vec::new();
    for w in 0..16 {
        let api = api.clone();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let value = format!("value-{w}-{i}");
                match api
                    .create(&PostParams::default(), &configmap(&name, &value))
                    .await
                {
                    Ok(_) => acknowledged.lock().unwrap().push((name, value)),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill();
    for w in writers {
        let _ = w.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 100,
        "only {} creates before the kill",
        acknowledged.len()
    );
    s.spawn();
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let stored: BTreeMap<String, String> = api
        .list(&Default::default())
        .await
        .expect("list after restart")
        .items
        .into_iter()
        .map(|cm| {
            let name = cm.metadata.name.clone().unwrap_or_default();
            let value = cm
                .data
                .and_then(|d| d.get("value").cloned())
                .unwrap_or_default();
            (name, value)
        })
        .collect();
    for (name, value) in &acknowledged {
        assert_eq!(
            stored.get(name),
            Some(value),
            "acknowledged create of {name} lost"
        );
    }
    eprintln!(
        "{} acknowledged creates all present after SIGKILL",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_restart_and_compaction_is_gone() {
    if !require_kubectl() {
        return;
    }
    let mut s = Server::start_with(&["--compaction-interval", "1s"]);
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let first = api
        .create(&PostParams::default(), &configmap("c0", "0"))
        .await
        .unwrap();
    let from = first.metadata.resource_version.clone().unwrap();
    for i in 1..=5 {
        api.create(&PostParams::default(), &configmap(&format!("c{i}"), "x"))
            .await
            .unwrap();
    }
    // Restart between the writes and the watch.
    s.terminate();
    s.spawn();
    let api: Api<ConfigMap> = Api::namespaced(client(&s).await, "default");
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &from)
        .await
        .expect("watch")
        .boxed();
    let mut names = Vec::new();
    let mut last_rv = 0i64;
    while names.len() < 5 {
        match stream.try_next().await.expect("watch stream") {
            Some(WatchEvent::Added(cm)) => {
                let rv: i64 = cm.metadata.resource_version.unwrap().parse().unwrap();
                assert!(rv > last_rv, "events out of order");
                last_rv = rv;
                let name = cm.metadata.name.unwrap();
                // The controller manager publishes the cluster CA in every
                // namespace, whenever it gets there: not this test's.
                if name != "kube-root-ca.crt" {
                    names.push(name);
                }
            }
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected watch event {other:?}"),
        }
    }
    assert_eq!(names, vec!["c1", "c2", "c3", "c4", "c5"]);

    // Writes move the revision on; after two compaction intervals the old
    // revision is gone.
    for i in 0..3 {
        api.create(&PostParams::default(), &configmap(&format!("d{i}"), "x"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &from)
        .await
        .expect("watch")
        .boxed();
    match stream.try_next().await {
        Ok(Some(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected a 410 Expired error event, got {other:?}"),
    }
}
