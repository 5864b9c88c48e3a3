//! `tinyfat events NAME [--json]`: the agent's wake manifest (SPEC §5), from
//! the timers table after re-reading the event files (read-only). With
//! `--json` it prints exactly the document `GET /api/agents/{id}/schedule`
//! answers; otherwise one line per event.

use tinyfat_platform::Platform;

use crate::output;

pub async fn run(platform: &Platform, name: &str, as_json: bool) -> anyhow::Result<()> {
    let agent = platform.agent(name).await?;
    // Event files written since the last turn (by hand, say) count too; this
    // only reads the prefix (no error.txt: that is the worker's, under the lease).
    if let Err(e) = platform.sync_event_timers(&agent, false).await {
        eprintln!("warning: could not re-read the event files ({e}); showing the last synced timers");
    }
    let manifest = platform.wake_manifest(&agent).await?;
    if as_json {
        return output::json(&manifest);
    }
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)).unwrap_or_else(|| "-".to_owned())
    };
    println!("next wake: {}", manifest.next_wake.map_or_else(|| "none".to_owned(), |t| when(Some(t))));
    if manifest.events.is_empty() {
        println!("no events (the agent schedules them in /data/events/NAME/event.json)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = manifest
        .events
        .iter()
        .map(|e| {
            let note = match (&e.error, e.status.is_active()) {
                (Some(error), _) => format!("error: {error}"),
                (None, false) => "done".to_owned(),
                (None, true) => String::new(),
            };
            vec![e.name.clone(), e.event_type.clone(), when(e.next_fire), note]
        })
        .collect();
    output::table(&["NAME", "TYPE", "NEXT FIRE", "NOTE"], &rows);
    Ok(())
}
