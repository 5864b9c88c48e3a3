//! What the OpenAI-compatible adapter puts on the wire, as the fake server
//! recorded it.

mod common;

use common::*;
use serde_json::json;
use tinyfat_model::{ClientOptions, HttpClient, ProviderCredentials, build_client};
use tinyfat_testkit::{Api, FakeModel};

#[tokio::test]
async fn request_carries_bearer_key_tool_calls_and_tool_messages() {
    let fake = FakeModel::start().await;
    let model = "openai:gpt-test";
    let (result, _) = run(&*client(&fake, model), &request(model)).await;
    assert_eq!(result.unwrap().message.text(), "ok");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(
        (sent.api, sent.path.as_str()),
        (Api::OpenAi, "/v1/chat/completions"),
        "a base URL ending in /v1 is not doubled"
    );
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    assert_eq!(sent.header("x-api-key"), None);

    let body = &sent.body;
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["max_tokens"], 1024, "compatible servers get max_tokens");
    assert_eq!(
        body["tools"],
        json!([{"type": "function", "function": {
            "name": "bash", "description": "Run a command", "parameters": request(model).tools[0].input_schema,
        }}])
    );
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0], json!({"role": "system", "content": "You are a test agent.\n\nMEMORY.md: likes tea"}));
    assert_eq!(messages[1], json!({"role": "user", "content": "list my files"}));
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[2]["content"], "Looking.");
    let call = &messages[2]["tool_calls"][0];
    assert_eq!((call["id"].as_str(), call["type"].as_str()), (Some("toolu_1"), Some("function")));
    assert_eq!(call["function"]["name"], "bash");
    let arguments: serde_json::Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"command": "ls"}), "arguments travel as a JSON string");
    assert_eq!(messages[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "notes.md"}));
}

#[tokio::test]
async fn a_local_server_gets_no_authorization_header() {
    let fake = FakeModel::start().await;
    let credentials = ProviderCredentials { openai_base_url: Some(fake.base_url()), ..Default::default() };
    let http = HttpClient::new(ClientOptions::default()).unwrap();
    let client = build_client("openai:llama3", &credentials, &http).unwrap();
    let (result, _) = run(&*client, &request("openai:llama3")).await;
    assert_eq!(result.unwrap().message.text(), "ok");
    let requests = fake.requests();
    assert_eq!(requests[0].path, "/v1/chat/completions", "/v1 is added to a bare base URL");
    assert_eq!(requests[0].header("authorization"), None);
}
