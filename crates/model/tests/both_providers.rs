//! Behaviour both adapters share, run against the fake server for each
//! provider: streaming round trips, tool input assembly, usage, errors,
//! retries and cancellation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tinyfat_core::message::{ContentBlock, Usage};
use tinyfat_model::{CancelToken, ModelError, RetryPolicy, RetryingClient, StopReason, StreamEvent};
use tinyfat_testkit::{FakeModel, Reply, Script, ScriptStop, ToolCall};

#[tokio::test]
async fn text_streams_in_deltas_and_assembles() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::text_deltas(&["Hel", "lo, ", "world"]));
        let (result, events) = run(&*client(&fake, model), &request(model)).await;
        let response = result.unwrap();
        assert_eq!(text_deltas(&events), vec!["Hel", "lo, ", "world"], "{model}");
        assert_eq!(response.message.content, vec![ContentBlock::Text { text: "Hello, world".into() }], "{model}");
        assert_eq!(response.stop_reason, StopReason::EndTurn, "{model}");
    }
}

#[tokio::test]
async fn tool_input_split_across_deltas_is_assembled() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::Reply(Reply {
            text: vec!["Let me ".into(), "check.".into()],
            tool_calls: vec![
                ToolCall::new("call_a", "bash", &["{\"comm", "and\": \"ls -", "la /data\", \"time", "out_s\": 5}"]),
                ToolCall::new("call_b", "read", &["{\"path\":", " \"a\\\"b.md\"}"]),
                ToolCall::new("call_c", "status", &[]),
            ],
            ..Default::default()
        }));
        let (result, events) = run(&*client(&fake, model), &request(model)).await;
        let response = result.unwrap();
        assert_eq!(response.stop_reason, StopReason::ToolUse, "{model}");
        assert_eq!(
            response.message.content,
            vec![
                ContentBlock::Text { text: "Let me check.".into() },
                ContentBlock::ToolUse {
                    id: "call_a".into(),
                    name: "bash".into(),
                    input: json!({"command": "ls -la /data", "timeout_s": 5}),
                },
                ContentBlock::ToolUse { id: "call_b".into(), name: "read".into(), input: json!({"path": "a\"b.md"}) },
                ContentBlock::ToolUse { id: "call_c".into(), name: "status".into(), input: json!({}) },
            ],
            "{model}"
        );
        let starts: Vec<&StreamEvent> =
            events.iter().filter(|e| matches!(e, StreamEvent::ToolUseStart { .. })).collect();
        assert_eq!(starts.len(), 3, "{model}");
        assert_eq!(streamed_input(&events, "call_a"), "{\"command\": \"ls -la /data\", \"timeout_s\": 5}", "{model}");
    }
}

#[tokio::test]
async fn usage_counts_cache_tokens() {
    let usage =
        Usage { input_tokens: 120, output_tokens: 42, cache_creation_input_tokens: 0, cache_read_input_tokens: 3000 };
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::text("hi").with_usage(usage));
        let (result, _) = run(&*client(&fake, model), &request(model)).await;
        assert_eq!(result.unwrap().usage, usage, "{model}");
    }
    // Anthropic also reports the tokens written to the cache.
    let fake = FakeModel::start().await;
    let written = Usage { cache_creation_input_tokens: 2048, ..usage };
    fake.push(Script::text("hi").with_usage(written));
    let (result, _) = run(&*client(&fake, MODELS[0]), &request(MODELS[0])).await;
    assert_eq!(result.unwrap().usage, written);
}

#[tokio::test]
async fn max_tokens_stop_is_reported() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::text("cut of").with_stop(ScriptStop::MaxTokens));
        let (result, _) = run(&*client(&fake, model), &request(model)).await;
        let response = result.unwrap();
        assert_eq!(response.stop_reason, StopReason::MaxTokens, "{model}");
        assert_eq!(response.message.text(), "cut of");
    }
}

#[tokio::test]
async fn overloaded_529_then_success_is_retried() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push_all([Script::overloaded(), Script::text("recovered")]);
        let (result, events) = run(&retrying(&fake, model), &request(model)).await;
        assert_eq!(result.unwrap().message.text(), "recovered", "{model}");
        assert_eq!(fake.requests().len(), 2, "{model}");
        assert_eq!(restarts(&events), 1, "{model}");
    }
}

#[tokio::test]
async fn server_error_500_is_retried() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push_all([Script::server_error(), Script::server_error(), Script::text("third time")]);
        let (result, events) = run(&retrying(&fake, model), &request(model)).await;
        assert_eq!(result.unwrap().message.text(), "third time", "{model}");
        assert_eq!(fake.requests().len(), 3, "{model}");
        assert_eq!(restarts(&events), 2, "{model}");
    }
}

#[tokio::test]
async fn rate_limit_429_waits_for_retry_after() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push_all([Script::rate_limited(1), Script::text("after the wait")]);
        let started = Instant::now();
        let (result, events) = run(&retrying(&fake, model), &request(model)).await;
        let elapsed = started.elapsed();
        assert_eq!(result.unwrap().message.text(), "after the wait", "{model}");
        // The backoff alone would wait 10 ms; only retry-after explains a second.
        assert!(elapsed >= Duration::from_secs(1), "{model}: retried after {elapsed:?}");
        assert!(
            events.iter().any(|e| matches!(e, StreamEvent::Restart { delay, .. } if *delay == Duration::from_secs(1))),
            "{model}: {events:?}"
        );
    }
}

#[tokio::test]
async fn retry_after_beyond_the_cap_is_left_to_the_caller() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push_all([Script::rate_limited(3600), Script::text("never")]);
        let (result, _) = run(&retrying(&fake, model), &request(model)).await;
        match result {
            Err(ModelError::Transient { status: Some(429), retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(3600)), "{model}");
            }
            other => panic!("{model}: {other:?}"),
        }
        assert_eq!(fake.requests().len(), 1, "{model}");
    }
}

#[tokio::test]
async fn transient_errors_stop_after_attempts_max() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.set_fallback(Script::overloaded());
        let client = RetryingClient::new(client(&fake, model), RetryPolicy { attempts_max: 3, ..fast_policy() });
        let (result, _) = run(&client, &request(model)).await;
        assert!(matches!(result, Err(ModelError::Transient { status: Some(529), .. })), "{model}: {result:?}");
        assert_eq!(fake.requests().len(), 3, "{model}");
    }
}

#[tokio::test]
async fn rejected_key_401_is_permanent_actionable_and_not_retried() {
    for (model, secret) in [(MODELS[0], "anthropic_api_key"), (MODELS[1], "openai_api_key")] {
        let fake = FakeModel::start().await;
        fake.push_all([Script::unauthorized(), Script::text("never")]);
        let (result, events) = run(&retrying(&fake, model), &request(model)).await;
        let Err(error @ ModelError::Permanent { .. }) = result else { panic!("{model}: {result:?}") };
        let message = error.to_string();
        assert!(message.contains("API key was rejected (401"), "{message}");
        assert!(message.contains(&format!("`tinyfat secret set NAME {secret}`")), "{message}");
        assert!(!message.contains("test-key"), "the key itself never appears: {message}");
        assert_eq!(fake.requests().len(), 1, "{model}");
        assert_eq!(restarts(&events), 0, "{model}");
    }
}

#[tokio::test]
async fn bad_request_400_is_not_retried() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::http_error(400, "invalid_request_error", "messages.1: tool_result without tool_use"));
        let (result, _) = run(&retrying(&fake, model), &request(model)).await;
        let Err(ModelError::BadRequest { message }) = result else { panic!("{model}: {result:?}") };
        assert!(message.contains("tool_result without tool_use"), "{message}");
        assert_eq!(fake.requests().len(), 1, "{model}");
    }
}

#[tokio::test]
async fn error_event_mid_stream_restarts_the_call() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        fake.push(Script::stream_error(&["Half an ans"], "overloaded_error", "Overloaded"));
        let (result, events) = run(&*client(&fake, model), &request(model)).await;
        assert!(matches!(result, Err(ModelError::Transient { status: None, .. })), "{model}: {result:?}");
        assert_eq!(text_deltas(&events), vec!["Half an ans"], "{model}");

        fake.push_all([
            Script::stream_error(&["Half an ans"], "overloaded_error", "Overloaded"),
            Script::text("Whole"),
        ]);
        let (result, events) = run(&retrying(&fake, model), &request(model)).await;
        assert_eq!(result.unwrap().message.text(), "Whole", "{model}");
        let restart = events.iter().position(|e| matches!(e, StreamEvent::Restart { .. })).expect("a restart");
        assert_eq!(text_deltas(&events[restart..]), vec!["Whole"], "{model}: only the retry's output follows");
        assert_eq!(text_deltas(&events[..restart]), vec!["Half an ans"], "{model}");
    }
}

#[tokio::test]
async fn malformed_stream_json_is_a_protocol_error_and_not_retried() {
    let bodies = [
        (MODELS[0], "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\n\n"),
        (MODELS[1], "data: {\"choices\": [{\"delta\": {\"content\": \"hi\"\n\ndata: [DONE]\n\n"),
    ];
    for (model, body) in bodies {
        let fake = FakeModel::start().await;
        fake.push_all([Script::raw(body), Script::text("never")]);
        let (result, _) = run(&retrying(&fake, model), &request(model)).await;
        let Err(error @ ModelError::Protocol { .. }) = result else { panic!("{model}: {result:?}") };
        assert!(error.to_string().contains("invalid JSON"), "{error}");
        assert_eq!(fake.requests().len(), 1, "{model}");
    }
}

#[tokio::test]
async fn stream_cut_short_is_transient() {
    let bodies = [
        (MODELS[0], "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"usage\": {}}}\n\n"),
        (MODELS[1], "data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \"hi\"}}]}\n\n"),
    ];
    for (model, body) in bodies {
        let fake = FakeModel::start().await;
        fake.push(Script::raw(body));
        let (result, _) = run(&*client(&fake, model), &request(model)).await;
        assert!(matches!(result, Err(ModelError::Transient { status: None, .. })), "{model}: {result:?}");
    }
}

#[tokio::test]
async fn cancelling_mid_stream_returns_promptly() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        let deltas: Vec<&str> = vec!["tick "; 10];
        fake.push(Script::text_deltas(&deltas).with_chunk_delay(Duration::from_secs(10)));
        let cancel = CancelToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let started = Instant::now();
        let (result, events) = run_with(&retrying(&fake, model), &request(model), &cancel).await;
        let elapsed = started.elapsed();
        assert!(matches!(result, Err(ModelError::Cancelled)), "{model}: {result:?}");
        assert!(elapsed < Duration::from_secs(3), "{model}: took {elapsed:?} with 10 s between chunks");
        assert!(text_deltas(&events).len() < 10, "{model}");
    }
}

#[tokio::test]
async fn cancelled_before_the_call_sends_nothing() {
    for model in MODELS {
        let fake = FakeModel::start().await;
        let cancel = CancelToken::new();
        cancel.cancel();
        let (result, events) = run_with(&*client(&fake, model), &request(model), &cancel).await;
        assert!(matches!(result, Err(ModelError::Cancelled)), "{model}: {result:?}");
        assert!(events.is_empty());
        assert!(fake.requests().is_empty(), "{model}");
    }
}

#[tokio::test]
async fn a_model_of_the_other_provider_is_refused() {
    let fake = FakeModel::start().await;
    let (result, _) = run(&*client(&fake, MODELS[0]), &request(MODELS[1])).await;
    assert!(matches!(result, Err(ModelError::Permanent { .. })), "{result:?}");
    let (result, _) = run(&*client(&fake, MODELS[1]), &request("gpt-4o")).await;
    assert!(matches!(result, Err(ModelError::UnknownProvider { .. })), "{result:?}");
    assert!(fake.requests().is_empty());
}
