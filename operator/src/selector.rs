//! Label selectors, matched as the API server matches them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector` (`matchLabels` and every `matchExpressions` requirement:
/// `In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector matches everything; an unknown
/// operator matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label =
        selector.match_labels.iter().flatten().all(|(key, value)| labels.get(key).is_some_and(|v| v == value));
    by_label
        && selector.match_expressions.iter().flatten().all(|req| {
            let value = labels.get(&req.key);
            let values = req.values.as_deref().unwrap_or_default();
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let pod = labels(&[("app", "trainer"), ("tier", "gpu")]);
        assert!(matches(&LabelSelector::default(), &pod));
        let by_label = LabelSelector { match_labels: Some(labels(&[("app", "trainer")])), ..Default::default() };
        assert!(matches(&by_label, &pod));
        assert!(!matches(&by_label, &labels(&[("app", "web")])));
        for (op, values, want) in [
            ("In", vec!["gpu", "cpu"], true),
            ("In", vec!["cpu"], false),
            ("NotIn", vec!["cpu"], true),
            ("NotIn", vec!["gpu"], false),
            ("Exists", vec![], true),
            ("DoesNotExist", vec![], false),
            ("Near", vec!["gpu"], false),
        ] {
            let s = LabelSelector { match_expressions: Some(vec![req("tier", op, &values)]), ..Default::default() };
            assert_eq!(matches(&s, &pod), want, "{op} {values:?}");
        }
        let absent =
            LabelSelector { match_expressions: Some(vec![req("zone", "NotIn", &["a"])]), ..Default::default() };
        assert!(matches(&absent, &pod), "NotIn holds for a label the pod does not have");
    }
}
