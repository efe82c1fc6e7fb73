//! The configuration file's parser and checker: any text gives a configuration with at least one
//! route, or errors that each say what is wrong and point inside the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spliced::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(Path::new("fuzz.toml"), text) {
        Ok(config) => assert!(!config.routes.is_empty()),
        Err(errors) => {
            assert!(!errors.is_empty());
            // A line may be one past the last (an error at the end of the text).
            let lines = text.split('\n').count();
            for e in errors {
                assert!(!e.message.is_empty(), "{e:?}");
                if let Some(line) = e.line {
                    assert!(
                        (1..=lines + 1).contains(&line),
                        "line {line} of {lines}: {e:?}"
                    );
                }
            }
        }
    }
});
