//! Entry points for the fuzz targets in `fuzz/` (`./task fuzz`): each takes raw input as a
//! client could send it and must never panic, only refuse. Not an API; hidden from the
//! docs. The unit tests below run each on a few hostile inputs, so `cargo test` keeps them
//! compiling and honest.

use serde_json::Value;

use crate::api::patch::{apply, PatchType};
use crate::api::selector::{FieldSelector, LabelSelector};

/// Apply `patch` to `target` (both JSON, as a PATCH request carries them) as each patch
/// type, within the API's limits. Returns how many applied.
pub fn patch(target: &[u8], patch: &[u8]) -> usize {
    let (Ok(t), Ok(p)) = (
        serde_json::from_slice::<Value>(target),
        serde_json::from_slice::<Value>(patch),
    ) else {
        return 0;
    };
    [PatchType::Json, PatchType::Merge, PatchType::StrategicMerge]
        .into_iter()
        .filter(|k| apply(&t, &p, *k).is_ok())
        .count()
}

/// Parse `s` as a label selector and as a field selector; a parsed one prints and parses
/// back to the same. Returns how many parsed.
pub fn selectors(s: &str) -> usize {
    let mut n = 0;
    if let Ok(l) = LabelSelector::parse(s) {
        let again = LabelSelector::parse(&l.to_string()).expect("a printed selector parses");
        assert_eq!(again.to_string(), l.to_string());
        n += 1;
    }
    if FieldSelector::parse(s).is_ok() {
        n += 1;
    }
    n
}

/// Decode a protobuf request body (`application/vnd.kubernetes.protobuf`).
pub fn protobuf(body: &[u8]) -> bool {
    crate::api::protobuf::decode(body).is_ok()
}

/// Decode a list's `continue` token.
pub fn continue_token(token: &str) -> bool {
    crate::api::registry::continue_token::decode_continue(token).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_inputs_are_refused_without_panicking() {
        assert_eq!(patch(b"{}", b"not json"), 0);
        let bomb: Vec<Value> = (0..30)
            .map(|i| serde_json::json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        let bomb = serde_json::to_vec(&bomb).unwrap();
        // the JSON patch is refused (too large); merge and strategic merge of an array
        // onto an object replace it
        assert!(patch(br#"{"a":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#, &bomb) < 3);
        assert_eq!(selectors("a in (b,c),!d,e!=f"), 1);
        assert_eq!(selectors("((("), 0);
        assert!(!protobuf(&[
            0x6b, 0x38, 0x73, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f
        ]));
        assert!(!continue_token("!!!"));
    }
}
