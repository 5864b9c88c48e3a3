//! Commands a person can type on any channel: `stop`, `/status`, `/clear`,
//! `/compact`, `/model [name]`. `stop` is the whole trimmed message in any
//! case; the others are case-sensitive slash words.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Stop,
    Status,
    Clear,
    Compact,
    Model(Option<String>),
}

pub fn parse(text: &str) -> Option<Command> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("stop") {
        return Some(Command::Stop);
    }
    let mut words = trimmed.split_whitespace();
    let command = match words.next()? {
        "/status" => Command::Status,
        "/clear" => Command::Clear,
        "/compact" => Command::Compact,
        "/model" => Command::Model(words.next().map(str::to_owned)),
        _ => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_nothing_else() {
        assert_eq!(parse("  STOP \n"), Some(Command::Stop));
        assert_eq!(parse("/status"), Some(Command::Status));
        assert_eq!(parse("/model"), Some(Command::Model(None)));
        assert_eq!(parse("/model openai:gpt-4o"), Some(Command::Model(Some("openai:gpt-4o".into()))));
        for not in ["stop it", "please stop", "/clear now", "/unknown", "", "/model a b"] {
            assert_eq!(parse(not), None, "{not}");
        }
    }
}
