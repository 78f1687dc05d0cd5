//! `docs/candidate-api.md` is the contract an engine implements: its stage
//! table must be exactly the code's stages, order, layouts, arches and
//! reference node mapping.

use divergence::trace::reference_map::stage_of;
use divergence::trace::Stage;
use divergence::Arch;

#[test]
fn the_documented_stage_table_is_the_codes() {
    let doc = include_str!("../docs/candidate-api.md");
    // The table of the stage contract section (other tables follow it).
    let section = doc
        .split("## The stage contract")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a stage contract section");
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), Stage::ALL.len(), "one table row per stage");
    for (row, stage) in rows.iter().zip(Stage::ALL) {
        assert_eq!(row.len(), 4, "{row:?}");
        assert_eq!(row[0], format!("`{}`", stage.name()), "order and names");
        assert_eq!(row[1], stage.layout(), "{stage}: layout");
        let arches: Vec<&str> = row[2].split(", ").collect();
        for arch in [Arch::Bitnet, Arch::Bitnet158, Arch::Bitnet25, Arch::Llama] {
            assert_eq!(
                arches.contains(&arch.name()),
                stage.in_arch(arch),
                "{stage}: arch {}",
                arch.name()
            );
        }
        // The first node named is the bitnet graph's, and maps to this stage.
        let node = row[3].split('`').nth(1).expect("a node name");
        let base = node.trim_end_matches("-L");
        let op = row[3]
            .split('(')
            .nth(1)
            .map(|o| o.split([',', ' ', ';', ')']).next().unwrap_or(""))
            .filter(|o| !o.is_empty() && o.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .unwrap_or("MUL_MAT");
        assert_eq!(
            stage_of(base, op),
            Some(stage),
            "{stage}: node {base} ({op})"
        );
    }
}
