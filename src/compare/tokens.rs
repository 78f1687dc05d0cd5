//! Compares token id sequences, reference first: where they first differ,
//! and that place in words, with the pieces around it.
//!
//! Knows nothing about how the ids were made: the caller hands in each
//! side's ids and a way to show a token (its piece as text).

use serde::{Deserialize, Serialize};

/// One token shown in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownToken {
    /// The token id.
    pub id: u32,
    /// The token's bytes (special tokens as their text), lossily as text.
    pub piece: String,
}

/// Where a sequence first differs from the reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDifference {
    /// Index of the first id that is not the same on every side.
    pub position: usize,
    /// Each side's token there (`None`: that side has ended), reference
    /// first, in the order the sides were given.
    pub tokens: Vec<(String, Option<ShownToken>)>,
    /// The reference's tokens just before the position (at most three).
    pub before: Vec<ShownToken>,
    /// The position in words, e.g. "at position 1 the candidate has a
    /// duplicated BOS 128000 \"<|begin_of_text|>\" where the reference has
    /// 128006 \"<|start_header_id|>\"".
    pub explanation: String,
}

/// The first position where any of `others` differs from `reference`
/// (sides are `(name, ids)`), explained with `show` and knowing the BOS id.
/// `None` when all are equal.
pub fn first_difference(
    reference: (&str, &[u32]),
    others: &[(&str, &[u32])],
    bos: Option<u32>,
    show: &dyn Fn(&str, u32) -> String,
) -> Option<TokenDifference> {
    let (ref_name, ref_ids) = reference;
    let mismatch = |ids: &[u32]| {
        let common = ref_ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        (common < ref_ids.len().max(ids.len())).then_some(common)
    };
    let position = others.iter().filter_map(|(_, ids)| mismatch(ids)).min()?;
    let shown = |side: &str, ids: &[u32]| {
        ids.get(position).map(|&id| ShownToken {
            id,
            piece: show(side, id),
        })
    };
    let mut tokens = vec![(ref_name.to_string(), shown(ref_name, ref_ids))];
    for (name, ids) in others {
        tokens.push((name.to_string(), shown(name, ids)));
    }
    let before = ref_ids[position.saturating_sub(3)..position]
        .iter()
        .map(|&id| ShownToken {
            id,
            piece: show(ref_name, id),
        })
        .collect();

    let words = |t: &Option<ShownToken>| match t {
        Some(t) => format!("{} {:?}", t.id, t.piece),
        None => "nothing (its ids end here)".to_string(),
    };
    let is_duplicated_bos = |ids: &[u32]| {
        position > 0
            && bos.is_some()
            && ids.get(position) == bos.as_ref()
            && ids[position - 1] == ids[position]
    };
    let mut parts = Vec::new();
    for (name, ids) in others {
        if mismatch(ids) != Some(position) {
            continue;
        }
        let theirs = shown(name, ids);
        let what = if is_duplicated_bos(ids) {
            format!("a duplicated BOS {}", words(&theirs))
        } else if position == 0 && bos.is_some() && ref_ids.first() == bos.as_ref() {
            format!("{} (no BOS)", words(&theirs))
        } else if position == 0 && bos.is_some() && ids.first() == bos.as_ref() {
            format!("an extra BOS {}", words(&theirs))
        } else {
            words(&theirs)
        };
        parts.push(format!("the {name} has {what}"));
    }
    let ref_what = if is_duplicated_bos(ref_ids) {
        format!("a duplicated BOS {}", words(&tokens[0].1))
    } else {
        words(&tokens[0].1)
    };
    let explanation = format!(
        "at position {position} {} where the {ref_name} has {ref_what}",
        parts.join(" and ")
    );
    Some(TokenDifference {
        position,
        tokens,
        before,
        explanation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(_: &str, id: u32) -> String {
        format!("t{id}")
    }

    #[test]
    fn names_the_first_difference() {
        assert!(first_difference(
            ("reference", &[1, 2]),
            &[("candidate", &[1, 2])],
            Some(1),
            &show
        )
        .is_none());
        let d = first_difference(
            ("reference", &[1, 5, 6]),
            &[("candidate", &[1, 1, 5, 6]), ("tokenizer_json", &[1, 5, 7])],
            Some(1),
            &show,
        )
        .unwrap();
        assert_eq!(d.position, 1);
        assert_eq!(
            d.explanation,
            "at position 1 the candidate has a duplicated BOS 1 \"t1\" where the reference has 5 \"t5\""
        );
        assert_eq!(
            d.before,
            [ShownToken {
                id: 1,
                piece: "t1".into()
            }]
        );
        let d = first_difference(
            ("reference", &[1, 5]),
            &[("candidate", &[5])],
            Some(1),
            &show,
        )
        .unwrap();
        assert_eq!(d.position, 0);
        assert!(d.explanation.contains("(no BOS)"), "{}", d.explanation);
        let d = first_difference(
            ("reference", &[5, 6]),
            &[("candidate", &[5])],
            Some(1),
            &show,
        )
        .unwrap();
        assert!(
            d.explanation.contains("nothing (its ids end here)"),
            "{}",
            d.explanation
        );
    }
}
