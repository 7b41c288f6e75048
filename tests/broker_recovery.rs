//! Startup accounts for every directory: a definition the metadata store
//! lost is restored from the definition file beside its data, a deletion
//! that never completed is undone, and data that nothing accounts for is
//! moved to `lost+found/`, never deleted.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestServer, ack_ids, test_config, text};
use courier::storage::meta::MetaStore;

fn lost_found(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("lost+found")) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
        Err(_) => Vec::new(),
    }
}

fn only_child(dir: &Path) -> String {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?} in {}", dir.display());
    names[0].clone()
}

#[tokio::test]
async fn a_topic_and_subscription_the_metadata_store_lost_are_restored_with_their_data() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("orders").await;
    c.create_sub("billing", "orders").await;
    c.publish("orders", &["one", "two", "three"]).await;
    let got = c.pull_n("billing", 3, Duration::from_secs(3)).await;
    let first: Vec<_> = got.iter().filter(|m| text(m) == "one").cloned().collect();
    c.ack("billing", ack_ids(&first)).await;
    server.stop().await;

    // What a power cut right after the creates did before the fix: the
    // store forgets both definitions, the directories remain.
    {
        let meta = MetaStore::open(&tmp.path().join("meta")).unwrap();
        meta.delete_subscription("billing").unwrap();
        meta.delete_topic("orders").unwrap();
    }

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let got = c.pull_n("billing", 2, Duration::from_secs(3)).await;
    let mut texts: Vec<String> = got.iter().map(text).collect();
    texts.sort();
    assert_eq!(texts, ["three", "two"], "acked 'one' stays acked");
    assert!(lost_found(tmp.path()).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_directory_without_any_definition_is_set_aside_not_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("orders").await;
    c.publish("orders", &["kept"]).await;
    server.stop().await;

    let topics = tmp.path().join("topics");
    let id = only_child(&topics);
    std::fs::remove_file(topics.join(&id).join("definition.json")).unwrap();
    {
        let meta = MetaStore::open(&tmp.path().join("meta")).unwrap();
        meta.delete_topic("orders").unwrap();
    }
    std::fs::create_dir(topics.join("not-ours")).unwrap();

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("orders").await; // the name is free again
    let aside = lost_found(tmp.path());
    assert_eq!(aside.len(), 2, "{aside:?}");
    let moved = aside
        .iter()
        .find(|n| n.starts_with(&format!("topics-{id}-")))
        .expect("the topic directory is in lost+found");
    let segments = std::fs::read_dir(tmp.path().join("lost+found").join(moved))
        .unwrap()
        .count();
    assert!(segments >= 1, "its segments were kept");
    assert!(aside.iter().any(|n| n.starts_with("topics-not-ours-")));
    server.stop().await;
}

#[tokio::test]
async fn a_deletion_that_never_removed_the_definition_is_undone() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("orders").await;
    c.create_sub("billing", "orders").await;
    c.publish("orders", &["still here"]).await;
    server.stop().await;

    // The process died between renaming the directory aside and removing
    // the definition.
    let topics = tmp.path().join("topics");
    let id = only_child(&topics);
    std::fs::rename(topics.join(&id), topics.join(format!("{id}.deleting"))).unwrap();

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let got = c.pull_n("billing", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&got[0]), "still here");
    assert_eq!(only_child(&topics), id);
    server.stop().await;
}

#[tokio::test]
async fn deleted_topics_and_subscriptions_stay_deleted_and_ids_are_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    c.create_topic("a").await;
    c.create_sub("a-sub", "a").await;
    c.create_topic("b").await;
    c.create_sub("b-sub", "b").await;
    c.publish("b", &["for b"]).await;
    c.admin
        .delete_topic(courier::api::pb::v1::DeleteTopicRequest {
            name: "a".into(),
            force: true,
        })
        .await
        .unwrap();
    c.admin
        .delete_subscription(courier::api::pb::v1::DeleteSubscriptionRequest {
            name: "b-sub".into(),
        })
        .await
        .unwrap();
    server.stop().await;
    assert_eq!(
        std::fs::read_dir(tmp.path().join("topics"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("subscriptions"))
            .unwrap()
            .count(),
        0
    );

    let server = TestServer::start_with(test_config(tmp.path())).await;
    let mut c = server.clients().await;
    let topics = c
        .admin
        .list_topics(courier::api::pb::v1::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = topics.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b"]);
    // A new subscription never picks up the deleted one's state.
    c.create_sub("b-sub", "b").await;
    c.publish("b", &["new"]).await;
    let got = c.pull_n("b-sub", 1, Duration::from_secs(3)).await;
    assert_eq!(text(&got[0]), "new");
    assert!(lost_found(tmp.path()).is_empty());
    server.stop().await;
}
