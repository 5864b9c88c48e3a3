//! The JSON admin API over real HTTP: the router served on 127.0.0.1:0 with
//! a platform on a temporary data folder (real SQLite, real storage),
//! driven with reqwest. Covers authentication (no, bad and revoked tokens),
//! authorisation (a user's token sees only its agents and gets the same 404
//! for another user's agent as for none), the error shapes (400, 409, 413,
//! 415), secrets never leaving, the dead-letter queue and the OpenAPI
//! document.

use std::path::Path;
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tinyfat_core::{EmailAddress, SessionId};
use tinyfat_platform::Platform;
use tinyfat_platform::api::api_routes;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::state::AppState;
use tinyfat_store::{Agent, Failure, JobState, NewJob};

const SECRET_VALUE: &str = "sk-ant-API-SECRET-MUST-NOT-LEAK-7781";
const BODY_BYTES_MAX: u64 = 2048;

struct Server {
    base: String,
    platform: Arc<Platform>,
    http: reqwest::Client,
    operator: String,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error field: {}", self.text)).to_owned()
    }
}

fn settings(dir: &Path) -> Settings {
    let env =
        [("TINYFAT_SANDBOX_MODE", "none".to_owned()), ("TINYFAT_GATEWAY_BODY_BYTES_MAX", BODY_BYTES_MAX.to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let platform = Arc::new(Platform::open(settings(dir.path())).await.unwrap());
    let app = api_routes().with_state(AppState::new(platform.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (_, operator) = platform.create_token(Some("test operator".into()), None).await.unwrap();
    Server { base, platform, http: reqwest::Client::new(), operator: operator.expose().to_owned(), _dir: dir }
}

impl Server {
    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        Answer { status: response.status(), headers: response.headers().clone(), text: response.text().await.unwrap() }
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        let request = self.request(method, path, token);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        self.send(request).await
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    async fn user_token(&self, email: &str) -> String {
        let email = EmailAddress::parse(email).unwrap();
        self.platform.create_token(None, Some(email)).await.unwrap().1.expose().to_owned()
    }

    async fn agent(&self, owner: &str, name: &str) -> Agent {
        let owner = EmailAddress::parse(owner).unwrap();
        self.platform.create_agent(CreateAgent { owner, name: Some(name.into()), model: None }).await.unwrap()
    }

    /// Enqueues a job for `agent` and fails it permanently: a dead letter.
    async fn dead_letter(&self, agent: &Agent, n: u32) -> String {
        let store = &self.platform.store;
        let now = self.platform.now_ms();
        let job = NewJob {
            id: ulid::Ulid::new().to_string(),
            dedup_key: format!("test:{}:{n}", agent.id),
            agent_id: agent.id.clone(),
            session: SessionId::parse("cli-main").unwrap(),
            kind: "message".into(),
            payload: json!({"text": format!("hello {n}")}).to_string(),
        };
        let id = store.enqueue(job, now).await.unwrap().job_id;
        let claim = store.claim_next("test-worker", now, 60_000).await.unwrap().expect("a claimable job");
        assert_eq!(claim.job_ids(), vec![id.clone()]);
        store.fail(&claim.lease, &claim.job_ids(), Failure::Permanent, "bad key", now, &mut || 0.0).await.unwrap();
        assert_eq!(store.get_job(&id).await.unwrap().unwrap().state, JobState::Dead);
        id
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn no_or_bad_credentials_are_401_with_a_bearer_challenge() {
    let s = start().await;
    for (path, auth) in [
        ("/api/agents", None),
        ("/api/openapi.json", None),
        ("/api/dlq", None),
        ("/api/tokens", None),
        ("/api/no-such-route", None),
        ("/api/agents", Some("Basic YWRtaW46YWRtaW4=")),
        ("/api/agents", Some("Bearer")),
        ("/api/agents", Some("Bearer tft_not-a-real-token")),
        ("/api/agents", Some("Bearer tft_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
    ] {
        let mut request = s.request(Method::GET, path, None);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let answer = s.send(request).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path} {auth:?}: {}", answer.text);
        assert_eq!(answer.headers["www-authenticate"], "Bearer", "{path} {auth:?}");
        assert!(!answer.error().is_empty());
    }
    assert_eq!(s.get("/api/agents", &s.operator).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_revoked_token_is_401_at_once() {
    let s = start().await;
    let created = s.call(Method::POST, "/api/tokens", Some(&s.operator), Some(json!({"name": "ci"}))).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.headers["cache-control"], "no-store");
    let created = created.json();
    let token = created["token"].as_str().unwrap();
    assert!(token.starts_with("tft_"));
    assert_eq!(s.get("/api/agents", token).await.status, StatusCode::OK);

    let id = created["id"].as_str().unwrap();
    let revoked = s.call(Method::DELETE, &format!("/api/tokens/{id}"), Some(&s.operator), None).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text);
    let answer = s.get("/api/agents", token).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.error(), "invalid or revoked API token");
    let again = s.call(Method::DELETE, &format!("/api/tokens/{id}"), Some(&s.operator), None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn operators_see_every_agent_and_users_their_own() {
    let s = start().await;
    s.agent("ann@example.com", "annsagent").await;
    s.agent("ann@example.com", "annsother").await;
    s.agent("bob@example.com", "bobsagent").await;
    let ann = s.user_token("ann@example.com").await;
    let carl = s.user_token("carl@example.com").await;

    assert_eq!(names(&s.get("/api/agents", &s.operator).await.json()), ["annsagent", "annsother", "bobsagent"]);
    assert_eq!(names(&s.get("/api/agents", &ann).await.json()), ["annsagent", "annsother"]);
    assert_eq!(names(&s.get("/api/agents", &carl).await.json()), Vec::<String>::new());
    let shown = s.get("/api/agents/annsagent", &ann).await.json();
    assert_eq!(shown["owner"], "ann@example.com");
    assert_eq!(shown["allowed_senders"], json!(["ann@example.com"]));
    assert_eq!(s.get("/api/agents/bobsagent", &s.operator).await.status, StatusCode::OK);
}

#[tokio::test]
async fn another_users_agent_answers_exactly_like_an_unknown_one_on_every_route() {
    let s = start().await;
    let bobs = s.agent("bob@example.com", "bobsagent").await;
    s.platform.set_secret(&bobs, "anthropic_api_key", &tinyfat_core::Secret::new(SECRET_VALUE)).await.unwrap();
    let ann = s.user_token("ann@example.com").await;
    let unknown = tinyfat_core::AgentId::from_ulid(ulid::Ulid::new()).to_string();

    for target in [bobs.id.to_string(), bobs.name.to_string(), unknown] {
        let routes: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, format!("/api/agents/{target}"), None),
            (Method::DELETE, format!("/api/agents/{target}?confirm=yes"), None),
            (Method::GET, format!("/api/agents/{target}/senders"), None),
            (Method::POST, format!("/api/agents/{target}/senders"), Some(json!({"sender": "eve@example.com"}))),
            (Method::DELETE, format!("/api/agents/{target}/senders/bob%40example.com"), None),
            (Method::GET, format!("/api/agents/{target}/secrets"), None),
            (Method::PUT, format!("/api/agents/{target}/secrets/x_key"), Some(json!({"value": "v"}))),
            (Method::DELETE, format!("/api/agents/{target}/secrets/anthropic_api_key"), None),
            (Method::GET, format!("/api/agents/{target}/status"), None),
            (Method::GET, format!("/api/dlq?agent={target}"), None),
        ];
        for (method, path, body) in routes {
            let answer = s.call(method.clone(), &path, Some(&ann), body).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {path}: {}", answer.text);
            assert_eq!(answer.json(), json!({"error": format!("no agent {target:?}")}), "{method} {path}");
        }
    }
    // Nothing changed on Bob's agent.
    let agent = s.platform.agent("bobsagent").await.unwrap();
    let view = s.platform.agent_view(&agent).await.unwrap();
    assert_eq!(view.allowed_senders.unwrap(), ["bob@example.com"]);
    assert_eq!(s.platform.list_secrets(&agent).await.unwrap().len(), 1);
}

#[tokio::test]
async fn secret_values_never_leave_the_server() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    s.agent("ann@example.com", "annsagent").await;
    let mut answers = Vec::new();
    let set = s
        .call(
            Method::PUT,
            "/api/agents/annsagent/secrets/anthropic_api_key",
            Some(&ann),
            Some(json!({"value": SECRET_VALUE})),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text);
    answers.push(set);
    let listed = s.get("/api/agents/annsagent/secrets", &ann).await;
    assert_eq!(listed.json()[0]["name"], "anthropic_api_key");
    answers.push(listed);
    for path in ["/api/agents", "/api/agents/annsagent", "/api/agents/annsagent/status", "/api/dlq"] {
        answers.push(s.get(path, &ann).await);
        answers.push(s.get(path, &s.operator).await);
    }
    let bad = s
        .call(Method::PUT, "/api/agents/annsagent/secrets/BAD-NAME", Some(&ann), Some(json!({"value": SECRET_VALUE})))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    answers.push(bad);
    for answer in &answers {
        assert!(!answer.text.contains(SECRET_VALUE), "secret leaked: {}", answer.text);
    }
    let agent = s.platform.agent("annsagent").await.unwrap();
    assert_eq!(s.platform.secret(&agent, "anthropic_api_key").await.unwrap().unwrap().expose(), SECRET_VALUE);

    let removed = s.call(Method::DELETE, "/api/agents/annsagent/secrets/anthropic_api_key", Some(&ann), None).await;
    assert_eq!(removed.status, StatusCode::OK);
    let again = s.call(Method::DELETE, "/api/agents/annsagent/secrets/anthropic_api_key", Some(&ann), None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn creating_agents_owner_rules_and_duplicate_names() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    let created = s.call(Method::POST, "/api/agents", Some(&ann), Some(json!({"name": "annsagent"}))).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let created = created.json();
    assert_eq!(created["owner"], "ann@example.com");
    assert!(created["id"].as_str().unwrap().starts_with("ag_"));

    let dup = s.call(Method::POST, "/api/agents", Some(&ann), Some(json!({"name": "annsagent"}))).await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "{}", dup.text);
    assert!(dup.error().contains("annsagent"));

    let not_hers = s.call(Method::POST, "/api/agents", Some(&ann), Some(json!({"owner": "bob@example.com"}))).await;
    assert_eq!(not_hers.status, StatusCode::FORBIDDEN);
    let no_owner = s.call(Method::POST, "/api/agents", Some(&s.operator), Some(json!({}))).await;
    assert_eq!(no_owner.status, StatusCode::BAD_REQUEST);
    assert!(no_owner.error().contains("owner"));
    let reserved = s
        .call(
            Method::POST,
            "/api/agents",
            Some(&s.operator),
            Some(json!({"owner": "bob@example.com", "name": "admin"})),
        )
        .await;
    assert_eq!(reserved.status, StatusCode::BAD_REQUEST, "{}", reserved.text);
    let bobs = s
        .call(
            Method::POST,
            "/api/agents",
            Some(&s.operator),
            Some(json!({"owner": "bob@example.com", "model": "openai:gpt-4o"})),
        )
        .await;
    assert_eq!(bobs.status, StatusCode::CREATED);
    assert_eq!(bobs.json()["model"], "openai:gpt-4o");
    assert_eq!(names(&s.get("/api/agents", &s.operator).await.json()).len(), 2);
}

#[tokio::test]
async fn malformed_json_is_400_and_creates_nothing() {
    let s = start().await;
    for body in ["{\"owner\": \"ann@example.com\"", "not json", "", "{\"owner\": 7}", "{\"ownr\": \"ann@example.com\"}"]
    {
        let request = s
            .request(Method::POST, "/api/agents", Some(&s.operator))
            .header("content-type", "application/json")
            .body(body);
        let answer = s.send(request).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body:?}: {}", answer.text);
        assert!(answer.error().starts_with("invalid JSON body: "), "{}", answer.text);
    }
    assert!(s.platform.store.list_agents(None).await.unwrap().is_empty());
    assert!(
        !s.platform.settings.data_dir.join("storage/agents").exists()
            || std::fs::read_dir(s.platform.settings.data_dir.join("storage/agents")).unwrap().next().is_none()
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let s = start().await;
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut request =
            s.request(Method::POST, "/api/agents", Some(&s.operator)).body(r#"{"owner":"ann@example.com"}"#);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let answer = s.send(request).await;
        assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
        assert!(answer.error().contains("application/json"));
    }
    assert!(s.platform.store.list_agents(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_declared_or_streamed() {
    let s = start().await;
    s.agent("ann@example.com", "annsagent").await;
    let big = json!({"value": "x".repeat(BODY_BYTES_MAX as usize * 4)});
    let answer =
        s.call(Method::PUT, "/api/agents/annsagent/secrets/big_key", Some(&s.operator), Some(big.clone())).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", answer.text);
    assert!(answer.error().contains(&BODY_BYTES_MAX.to_string()));

    // Without a Content-Length: chunked, cut off while reading.
    let bytes = big.to_string().into_bytes();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let request = s
        .request(Method::PUT, "/api/agents/annsagent/secrets/big_key", Some(&s.operator))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)));
    let answer = s.send(request).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", answer.text);

    let agent = s.platform.agent("annsagent").await.unwrap();
    assert!(s.platform.list_secrets(&agent).await.unwrap().is_empty());
    let small = json!({"value": "fits"});
    let answer = s.call(Method::PUT, "/api/agents/annsagent/secrets/small_key", Some(&s.operator), Some(small)).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn senders_round_trip_with_percent_encoded_rules() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    s.agent("ann@example.com", "annsagent").await;
    for (sender, status) in [
        ("telegram:chat:-100123", StatusCode::CREATED),
        ("@example.org", StatusCode::CREATED),
        ("@example.org", StatusCode::OK),
    ] {
        let answer =
            s.call(Method::POST, "/api/agents/annsagent/senders", Some(&ann), Some(json!({"sender": sender}))).await;
        assert_eq!(answer.status, status, "{sender}: {}", answer.text);
    }
    let bad = s.call(Method::POST, "/api/agents/annsagent/senders", Some(&ann), Some(json!({"sender": "nope"}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let listed = s.get("/api/agents/annsagent/senders", &ann).await.json();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");

    let removed =
        s.call(Method::DELETE, "/api/agents/annsagent/senders/telegram%3Achat%3A-100123", Some(&ann), None).await;
    assert_eq!(removed.json()["removed"], true, "{}", removed.text);
    let removed = s.call(Method::DELETE, "/api/agents/annsagent/senders/%40example.org", Some(&ann), None).await;
    assert_eq!(removed.json()["removed"], true);
    let absent = s.call(Method::DELETE, "/api/agents/annsagent/senders/%40example.org", Some(&ann), None).await;
    assert_eq!(absent.json()["removed"], false);
    assert_eq!(s.get("/api/agents/annsagent/senders", &ann).await.json(), json!(["ann@example.com"]));
}

#[tokio::test]
async fn deleting_an_agent_needs_confirmation() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    let agent = s.agent("ann@example.com", "annsagent").await;
    let refused = s.call(Method::DELETE, "/api/agents/annsagent", Some(&ann), None).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.error().contains("confirm=yes"));
    assert!(s.platform.agent("annsagent").await.is_ok());

    let deleted = s.call(Method::DELETE, &format!("/api/agents/{}?confirm=yes", agent.id), Some(&ann), None).await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    assert_eq!(deleted.json()["deleted"], agent.id.to_string());
    assert_eq!(s.get("/api/agents/annsagent", &ann).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn status_reports_the_queue() {
    let s = start().await;
    let agent = s.agent("ann@example.com", "annsagent").await;
    let status = s.get("/api/agents/annsagent/status", &s.operator).await.json();
    assert_eq!(status, json!({"agent": "annsagent", "running": false, "queued": 0, "dead": 0, "active_run": null}));
    s.dead_letter(&agent, 1).await;
    let job = NewJob {
        id: ulid::Ulid::new().to_string(),
        dedup_key: "test:queued".into(),
        agent_id: agent.id.clone(),
        session: SessionId::parse("cli-main").unwrap(),
        kind: "message".into(),
        payload: "{}".into(),
    };
    s.platform.store.enqueue(job, s.platform.now_ms()).await.unwrap();
    let status = s.get(&format!("/api/agents/{}/status", agent.id), &s.operator).await.json();
    assert_eq!(status["queued"], 1);
    assert_eq!(status["dead"], 1);
    assert_eq!(status["running"], false);
}

#[tokio::test]
async fn dead_letters_over_http() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    let anns = s.agent("ann@example.com", "annsagent").await;
    let bobs = s.agent("bob@example.com", "bobsagent").await;
    let ann_dead = s.dead_letter(&anns, 1).await;
    let ann_dead2 = s.dead_letter(&anns, 2).await;
    let bob_dead = s.dead_letter(&bobs, 3).await;
    s.dead_letter(&bobs, 4).await;
    s.dead_letter(&bobs, 5).await;

    let all = s.get("/api/dlq", &s.operator).await.json();
    assert_eq!(all.as_array().unwrap().len(), 5, "{all}");
    assert!(all[0].get("payload").is_none(), "listings carry no payloads");
    let own = s.get("/api/dlq", &ann).await.json();
    let ids: Vec<_> = own.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&ann_dead.as_str()) && ids.contains(&ann_dead2.as_str()));
    assert_eq!(own[0]["agent"], "annsagent");
    assert_eq!(own[0]["error"], "bad key");
    let one = s.get("/api/dlq?limit=1", &s.operator).await.json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(s.get("/api/dlq?limit=0", &s.operator).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.get("/api/dlq?agent=bobsagent", &s.operator).await.json().as_array().unwrap().len(), 3);

    let shown = s.get(&format!("/api/dlq/{ann_dead}"), &ann).await.json();
    assert_eq!(shown["payload"], json!({"text": "hello 1"}));
    assert_eq!(shown["kind"], "message");
    // Bob's dead letter is invisible to Ann, exactly like a missing one.
    for path in [format!("/api/dlq/{bob_dead}"), "/api/dlq/01JUNKJUNKJUNKJUNKJUNKJUNK".to_owned()] {
        for (method, path) in
            [(Method::GET, path.clone()), (Method::POST, format!("{path}/replay")), (Method::DELETE, path.clone())]
        {
            let answer = s.call(method.clone(), &path, Some(&ann), None).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(answer.error().starts_with("no dead letter"));
        }
    }
    assert_eq!(s.platform.store.get_job(&bob_dead).await.unwrap().unwrap().state, JobState::Dead);

    let replayed = s.call(Method::POST, &format!("/api/dlq/{ann_dead}/replay"), Some(&ann), None).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.text);
    let job = s.platform.store.get_job(&ann_dead).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 0));
    let twice = s.call(Method::POST, &format!("/api/dlq/{ann_dead}/replay"), Some(&ann), None).await;
    assert_eq!(twice.status, StatusCode::NOT_FOUND);

    // A user's replay-all touches only that user's dead letters.
    let all = s.call(Method::POST, "/api/dlq/replay-all", Some(&ann), None).await.json();
    assert_eq!(all["replayed"], 1);
    assert_eq!(s.platform.store.get_job(&ann_dead2).await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(s.platform.store.get_job(&bob_dead).await.unwrap().unwrap().state, JobState::Dead);

    let refused = s.call(Method::DELETE, "/api/dlq", Some(&ann), None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let purged = s.call(Method::DELETE, &format!("/api/dlq/{bob_dead}"), Some(&s.operator), None).await;
    assert_eq!(purged.json(), json!({"id": bob_dead, "purged": 1}));
    assert!(s.platform.store.get_job(&bob_dead).await.unwrap().is_none());

    let purged = s.call(Method::DELETE, "/api/dlq", Some(&s.operator), None).await;
    assert_eq!(purged.json(), json!({"purged": 2}));
    assert_eq!(s.get("/api/dlq", &s.operator).await.json(), json!([]));
}

#[tokio::test]
async fn tokens_are_for_operators_and_never_listed_in_clear() {
    let s = start().await;
    let ann = s.user_token("ann@example.com").await;
    for (method, path, body) in [
        (Method::GET, "/api/tokens", None),
        (Method::POST, "/api/tokens", Some(json!({}))),
        (Method::DELETE, "/api/tokens/tk_x", None),
    ] {
        let answer = s.call(method.clone(), path, Some(&ann), body).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    let created = s
        .call(
            Method::POST,
            "/api/tokens",
            Some(&s.operator),
            Some(json!({"name": "bobs laptop", "user": "bob@example.com"})),
        )
        .await
        .json();
    assert_eq!(created["user"], "bob@example.com");
    let bob = created["token"].as_str().unwrap().to_owned();
    s.agent("bob@example.com", "bobsagent").await;
    assert_eq!(names(&s.get("/api/agents", &bob).await.json()), ["bobsagent"]);

    let listed = s.get("/api/tokens", &s.operator).await;
    let tokens = listed.json();
    assert_eq!(tokens.as_array().unwrap().len(), 3);
    assert!(!listed.text.contains(&bob) && !listed.text.contains(&ann) && !listed.text.contains(&s.operator));
    assert!(!listed.text.contains(&tinyfat_platform::tokens::hash_token(&bob)));
    assert_eq!(tokens[2]["name"], "bobs laptop");
    assert_eq!(tokens[2]["user"], "bob@example.com");
    assert_eq!(tokens[0]["user"], Value::Null);
    let bad = s.call(Method::POST, "/api/tokens", Some(&s.operator), Some(json!({"user": "not-an-email"}))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let s = start().await;
    let answer = s.get("/api/nothing/here", &s.operator).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(answer.error().contains("openapi.json"));
    let answer = s.call(Method::PATCH, "/api/agents", Some(&s.operator), None).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.json(), json!({"error": "method not allowed"}));
    assert!(answer.headers.contains_key("allow"));
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let s = start().await;
    let answer = s.get("/api/openapi.json", &s.operator).await;
    assert_eq!(answer.status, StatusCode::OK);
    let doc = answer.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/healthz", &["get"][..]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/webhooks/resend", &["post"]),
        ("/webhooks/telegram/{agent_id}", &["post"]),
        ("/webhooks/slack/{agent_id}", &["post"]),
        ("/api/openapi.json", &["get"]),
        ("/api/agents", &["get", "post"]),
        ("/api/agents/{id}", &["get", "delete"]),
        ("/api/agents/{id}/senders", &["get", "post"]),
        ("/api/agents/{id}/senders/{sender}", &["delete"]),
        ("/api/agents/{id}/secrets", &["get"]),
        ("/api/agents/{id}/secrets/{name}", &["put", "delete"]),
        ("/api/agents/{id}/status", &["get"]),
        ("/api/agents/{id}/schedule", &["get"]),
        ("/api/agents/{id}/chat", &["post"]),
        ("/api/agents/{id}/runs/{request_id}/events", &["get"]),
        ("/api/dlq", &["get", "delete"]),
        ("/api/dlq/replay-all", &["post"]),
        ("/api/dlq/{id}", &["get", "delete"]),
        ("/api/dlq/{id}/replay", &["post"]),
        ("/api/tokens", &["get", "post"]),
        ("/api/tokens/{id}", &["delete"]),
    ] {
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} is not documented"));
        for method in methods {
            assert!(item.get(*method).is_some(), "{method} {path} is not documented");
        }
    }
    assert_eq!(paths.len(), 23, "a documented path the test does not know");
    let chat = &paths["/api/agents/{id}/chat"]["post"]["responses"]["200"]["content"];
    assert!(chat.get("text/event-stream").is_some());
}
