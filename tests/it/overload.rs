//! Overload: pushed far beyond what it can commit, the service answers 200 (committed) or 503 +
//! Retry-After (not stored, retry), nothing else, and its memory stays bounded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::helpers::*;
use crate::process::ServeProcess;

fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_200_or_503_only_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("overload.db").display());
    // A small queue so that 503s really happen, and many more clients than it holds.
    let svc = ServeProcess::start(&db_url, &["--write-queue", "64", "--max-in-flight", "256"], &[]).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(400).build().unwrap();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..400u64 {
        let (client, base, acked, refused) = (client.clone(), svc.base.clone(), acked.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..60u64 {
                let msg_id = format!("{}{:06}", 9_000_000 + t, n);
                let body = roster_body(&msg_id, &format!("u{t}"), &format!("v{n}"), "add", 1_700_000_000_000, SECRET);
                let r = client
                    .post(format!("{base}/callbacks/easemob"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => {
                        acked.lock().unwrap().insert(format!("{APPKEY}_{msg_id}"));
                    }
                    503 => {
                        assert!(r.headers().contains_key("retry-after"));
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => panic!("only 200 or 503 under overload, got {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rss = peak_rss_bytes(svc.pid);
    let acked = acked.lock().unwrap().clone();
    println!(
        "overload: 24,000 requests from 400 clients: {} committed, {} refused with 503; peak RSS {:.1} MB",
        acked.len(),
        refused.load(std::sync::atomic::Ordering::Relaxed),
        rss as f64 / 1_048_576.0
    );
    assert!(rss < 150 * 1024 * 1024, "peak RSS {rss} bytes stays bounded");

    // Every 200 is stored.
    let http = reqwest::Client::new();
    let mut stored = HashSet::new();
    let mut cursor = String::new();
    loop {
        let page: serde_json::Value = http
            .get(format!("{}/v1/callbacks?limit=1000{cursor}", svc.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for item in page["items"].as_array().unwrap() {
            stored.insert(item["call_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert!(acked.is_subset(&stored), "acknowledged-but-lost = {}", acked.difference(&stored).count());
    assert_eq!(acked.len(), stored.len(), "nothing refused was stored");

    // /metrics counted every answer where it belongs: an operator sees the 503s as they happen.
    let text = http.get(format!("{}/metrics", svc.base)).send().await.unwrap().text().await.unwrap();
    let m = friendhook::metrics::parse_samples(&text);
    let received = |result: &str| m[&format!("friendhook_callbacks_received_total{{result=\"{result}\"}}")];
    assert_eq!(received("stored"), acked.len() as f64, "{text}");
    assert_eq!(received("overloaded"), refused.load(std::sync::atomic::Ordering::Relaxed) as f64, "{text}");
    assert_eq!(received("duplicate") + received("unavailable"), 0.0, "{text}");
    svc.signal("TERM");
}
