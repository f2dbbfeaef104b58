//! The per-layer plan: ordered (name pattern → method) rules, first match wins, so one
//! plan applies to any model built from [`QLinear`](super::QLinear) layers.

use super::method::Method;
use anyhow::{bail, Context, Result};
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub pattern: String,
    pub method: Method,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rules: Vec<Rule>,
}

/// Glob match where `*` matches any run of characters (dots included).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl Plan {
    /// Every layer gets the same method.
    pub fn uniform(method: Method) -> Self {
        Plan {
            rules: vec![Rule {
                pattern: "*".into(),
                method,
            }],
        }
    }

    /// Checks the plan against a model's layer names: a rule that matches no layer (a
    /// typo, another model's names, or a rule shadowed by an earlier one) is returned as a
    /// warning naming it; a plan none of whose rules decides any layer is an error, since
    /// it would measure the unquantized model under the plan's name.
    pub fn check_layers<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>> {
        let names: Vec<&str> = names.into_iter().collect();
        let mut used = vec![false; self.rules.len()];
        for n in &names {
            if let Some(i) = self.rules.iter().position(|r| glob_match(&r.pattern, n)) {
                used[i] = true;
            }
        }
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let example = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
        if !used.iter().any(|&u| u) {
            bail!(
                "no rule of the plan matches any of the model's {} layers (they are named like {example}): check the patterns",
                names.len()
            );
        }
        Ok(self
            .rules
            .iter()
            .zip(&used)
            .filter(|(_, &u)| !u)
            .map(|(r, _)| {
                let shadowed = names.iter().any(|n| glob_match(&r.pattern, n));
                format!(
                    "plan rule '{}={}' matches no layer{}",
                    r.pattern,
                    r.method,
                    if shadowed {
                        " (earlier rules take every layer it names)".to_string()
                    } else {
                        format!(" (layers are named like {example})")
                    }
                )
            })
            .collect())
    }

    /// The method for a layer; layers no rule matches stay as loaded (`keep`).
    pub fn method_for(&self, name: &str) -> Method {
        self.rules
            .iter()
            .find(|r| glob_match(&r.pattern, name))
            .map(|r| r.method.clone())
            .unwrap_or_else(Method::keep)
    }
}

/// Parses `pattern=method` rules separated by commas or semicolons, e.g.
/// `lm_head=f32;*.mlp.*=w:i4:sym:g64;*=w:i8:sym:ch0`. A bare method means `*=method`.
impl FromStr for Plan {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut rules = Vec::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (pattern, method) = match part.split_once('=') {
                Some((p, m)) => (p.trim(), m.trim()),
                None => ("*", part),
            };
            if pattern.is_empty() {
                bail!("empty layer pattern in plan rule '{part}'");
            }
            let method = method
                .parse()
                .with_context(|| format!("in plan rule '{part}'"))?;
            rules.push(Rule {
                pattern: pattern.to_string(),
                method,
            });
        }
        if rules.is_empty() {
            bail!("empty plan: give rules like '*.mlp.*=w:i8:sym:ch0;*=f32'");
        }
        Ok(Plan { rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "model.layers.0.mlp.up_proj"));
        assert!(glob_match("*.mlp.*", "model.layers.0.mlp.up_proj"));
        assert!(!glob_match("*.mlp.*", "model.layers.0.self_attn.q_proj"));
        assert!(glob_match("fc?", "fc?"));
        assert!(glob_match("lm_head", "lm_head"));
        assert!(!glob_match("lm_head", "lm_head2"));
        assert!(glob_match("*proj", "q_proj"));
    }

    #[test]
    fn first_match_wins() {
        let p: Plan = "lm_head=f32; *.mlp.*=w:i4:sym:g64; *=dynamic-int8"
            .parse()
            .unwrap();
        assert_eq!(p.method_for("lm_head"), "f32".parse().unwrap());
        assert_eq!(
            p.method_for("model.layers.3.mlp.down_proj").to_string(),
            "w:i4:sym:g64"
        );
        assert_eq!(
            p.method_for("model.layers.3.self_attn.q_proj"),
            "dynamic-int8".parse().unwrap()
        );
        let only_ffn: Plan = "*.mlp.*=f16".parse().unwrap();
        assert!(only_ffn.method_for("x.self_attn.q_proj").is_keep());
        assert!("".parse::<Plan>().is_err());
        assert!("*=int3".parse::<Plan>().is_err());
    }

    #[test]
    fn rules_that_match_nothing_are_named() {
        let names = [
            "model.layers.0.mlp.up_proj",
            "model.layers.0.self_attn.q_proj",
            "lm_head",
        ];
        let p: Plan = "lm_head=f32;*.mlp.*=w:i4:sym:g64".parse().unwrap();
        assert!(p.check_layers(names).unwrap().is_empty());
        let p: Plan = "*.ffn.*=w:i4:sym:g64;*.mlp.*=f16".parse().unwrap();
        let w = p.check_layers(names).unwrap();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("'*.ffn.*=w:i4:sym:g64'") && w[0].contains("lm_head"),
            "{w:?}"
        );
        let p: Plan = "*=f16;*.mlp.*=w:i4:sym:g64".parse().unwrap();
        let w = p.check_layers(names).unwrap();
        assert!(w.len() == 1 && w[0].contains("earlier rules"), "{w:?}");
        let p: Plan = "encoder.*=f16;decoder.*=f16".parse().unwrap();
        let e = p.check_layers(names).unwrap_err().to_string();
        assert!(e.contains("no rule") && e.contains("3 layers"), "{e}");
        assert!(p.check_layers([]).unwrap().is_empty());
    }
}
