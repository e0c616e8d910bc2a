//! `tests:`: a pipeline's own test cases (`sluice test`), input rows and the output expected.

use super::*;

pub(super) const TEST_KEYS: &[&str] = &["name", "input", "expected", "output"];

/// `outputs`: the pipeline's outputs; a case names the one it checks (`output: NAME`)
/// when there are several.
pub(super) fn parse_tests(
    node: Option<&Node>,
    outputs: &[SinkConfig],
    problems: &mut Problems,
) -> Vec<TestCase> {
    let path = Location::new("tests");
    let Some(node) = node else { return Vec::new() };
    let Value::Seq(items) = &node.value else {
        problems.at(
            &path,
            node,
            format!("expected a list of test cases, found {}", node.describe()),
        );
        return Vec::new();
    };
    let mut tests = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = path.index(i);
        if !check_keys(item, &path, TEST_KEYS, problems) {
            continue;
        }
        let name = match item.get("name").and_then(Node::scalar) {
            Some(n) => n.to_string(),
            None => {
                problems.at(&path.key("name"), item, "missing required field `name`");
                continue;
            }
        };
        let rows = |key: &str, problems: &mut Problems| -> Option<Vec<Node>> {
            let Some(list) = item.get(key) else {
                problems.at(
                    &path.key(key),
                    item,
                    format!("missing required field `{key}`"),
                );
                return None;
            };
            match &list.value {
                Value::Seq(rows) => {
                    let mut ok = true;
                    for (j, row) in rows.iter().enumerate() {
                        if !matches!(row.value, Value::Map(_)) {
                            problems.at(
                                &path.key(key).index(j),
                                row,
                                format!("expected a record (a mapping), found {}", row.describe()),
                            );
                            ok = false;
                        }
                    }
                    ok.then(|| rows.clone())
                }
                _ => {
                    problems.at(
                        &path.key(key),
                        list,
                        format!("expected a list of records, found {}", list.describe()),
                    );
                    None
                }
            }
        };
        let names = || {
            outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let output = match item.get("output") {
            Some(n) => match outputs
                .iter()
                .position(|o| Some(o.name.as_str()) == n.scalar())
            {
                Some(o) => o,
                None => {
                    problems.at(
                        &path.key("output"),
                        n,
                        format!(
                            "{} is not an output of the pipeline; expected one of {}",
                            n.describe(),
                            names()
                        ),
                    );
                    continue;
                }
            },
            None if outputs.len() > 1 => {
                problems.at(
                    &path,
                    item,
                    format!("the pipeline has several outputs: say which one the case checks with `output:` (one of {})", names()),
                );
                continue;
            }
            None => 0,
        };
        let input = rows("input", problems);
        let expected = rows("expected", problems);
        if let (Some(input), Some(expected)) = (input, expected) {
            tests.push(TestCase {
                name,
                input: input
                    .into_iter()
                    .map(|n| {
                        let json = n.to_json();
                        (n, json)
                    })
                    .collect(),
                expected: expected.iter().map(Node::to_json).collect(),
                output,
                at: At {
                    node: item.clone(),
                    path,
                },
            });
        }
    }
    tests
}
