//! The Corefile as a configuration source: node-local-dns's CoreDNS configuration, read into
//! the same `FileConfig` the TOML file fills.
//!
//! Three steps: the `__PILLAR__` placeholders are filled as node-cache fills them when it
//! renders its template (`render`), the text is split into server blocks and directives
//! (`parse`, the Caddyfile syntax CoreDNS uses), and the blocks are mapped onto `FileConfig`
//! (`corefile_map`). Every error names the file and the line.

use std::path::Path;

use super::ConfigError;

/// What node-cache substitutes into its Corefile template at run time.
#[derive(Debug, Clone, Default)]
pub struct Pillars {
    /// `-localip`: `__PILLAR__LOCAL__DNS__`, space separated.
    pub local_ips: Vec<String>,
    /// The `-upstreamsvc` Service's IP (from `<SVC>_SERVICE_HOST`): `__PILLAR__CLUSTER__DNS__`.
    pub cluster_dns: Option<String>,
    /// The environment variable `cluster_dns` was looked up in, for the error message.
    pub cluster_dns_var: String,
    /// kube-dns ConfigMap `upstreamNameservers`: `__PILLAR__UPSTREAM__SERVERS__`, else
    /// `/etc/resolv.conf`.
    pub upstream_servers: Vec<String>,
    /// `-prometheus-listen-address`: `__PROMETHEUS__ENDPOINT__`.
    pub prometheus: String,
}

/// The rendered text, and the lines where `__PILLAR__UPSTREAM__SERVERS__` stood when the
/// ConfigMap's upstream nameservers filled it (node-cache then turns that `forward` to UDP).
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub custom_upstream_lines: Vec<usize>,
}

/// Fills the placeholders line by line, as node-cache's `updateCorefile` does for the whole
/// text; `__PILLAR__DNS__SERVER__` left over (IPVS mode) becomes empty. A placeholder that
/// cannot be filled, or one node-cache does not know, is an error naming its line.
pub fn render(path: &Path, text: &str, p: &Pillars) -> Result<Rendered, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut custom_upstream_lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut l = line.to_string();
        if l.contains("__PILLAR__UPSTREAM__SERVERS__") {
            if p.upstream_servers.is_empty() {
                l = l.replace("__PILLAR__UPSTREAM__SERVERS__", "/etc/resolv.conf");
            } else {
                l = l.replace(
                    "__PILLAR__UPSTREAM__SERVERS__",
                    &p.upstream_servers.join(" "),
                );
                custom_upstream_lines.push(n);
            }
        }
        if l.contains("__PILLAR__CLUSTER__DNS__") {
            let ip = p.cluster_dns.as_deref().ok_or_else(|| {
                parse_error(
                    path,
                    n,
                    format!(
                        "__PILLAR__CLUSTER__DNS__: {} is not set (the -upstreamsvc Service must \
                         exist before the pod starts)",
                        p.cluster_dns_var
                    ),
                )
            })?;
            l = l.replace("__PILLAR__CLUSTER__DNS__", ip);
        }
        if l.contains("__PILLAR__LOCAL__DNS__") {
            if p.local_ips.is_empty() {
                return Err(parse_error(
                    path,
                    n,
                    "__PILLAR__LOCAL__DNS__: no -localip (--local-ip) given to fill it",
                ));
            }
            l = l.replace("__PILLAR__LOCAL__DNS__", &p.local_ips.join(" "));
        }
        l = l.replace("__PILLAR__DNS__SERVER__", "");
        l = l.replace("__PROMETHEUS__ENDPOINT__", &p.prometheus);
        if let Some(at) = l.find("__PILLAR__") {
            let name: String = l[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            return Err(parse_error(
                path,
                n,
                format!("{name}: placeholder not filled (substitute it when installing, as the node-local-dns documentation's sed does)"),
            ));
        }
        out.push_str(&l);
        out.push('\n');
    }
    Ok(Rendered {
        text: out,
        custom_upstream_lines,
    })
}

pub(super) fn parse_error(path: &Path, line: usize, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::Parse {
        path: path.to_owned(),
        message: format!("line {line}: {msg}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
    quoted: bool,
}

/// Splits into tokens: whitespace separated, `"..."` quoted, `#` to the end of a line a
/// comment.
fn tokenize(path: &Path, text: &str) -> Result<Vec<Token>, ConfigError> {
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == '\n' {
            line += 1;
            chars.next();
        } else if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            while chars.peek().is_some_and(|&c| c != '\n') {
                chars.next();
            }
        } else if c == '"' {
            let start = line;
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err(parse_error(path, start, "unterminated quote")),
                    Some('"') => break,
                    Some('\\') if chars.peek() == Some(&'"') => {
                        s.push('"');
                        chars.next();
                    }
                    Some(c) => {
                        if c == '\n' {
                            line += 1;
                        }
                        s.push(c)
                    }
                }
            }
            tokens.push(Token {
                text: s,
                line: start,
                quoted: true,
            });
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                s.push(c);
                chars.next();
            }
            tokens.push(Token {
                text: s,
                line,
                quoted: false,
            });
        }
    }
    Ok(tokens)
}

/// One directive (`forward . 10.0.0.10 { force_tcp }`): its name, arguments and the lines of
/// its `{ }` block, each a directive without a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub line: usize,
    pub args: Vec<String>,
    pub block: Vec<Directive>,
}

/// A server block: its keys (`cluster.local:53`) and directives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBlock {
    pub keys: Vec<String>,
    pub line: usize,
    pub directives: Vec<Directive>,
}

fn is_open(t: &Token) -> bool {
    !t.quoted && t.text == "{"
}

fn is_close(t: &Token) -> bool {
    !t.quoted && t.text == "}"
}

/// Parses the server blocks. Snippets and `import` are refused: node-local-dns does not use
/// them and they would make the lines of errors point elsewhere.
pub fn parse(path: &Path, text: &str) -> Result<Vec<ServerBlock>, ConfigError> {
    let tokens = tokenize(path, text)?;
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let line = tokens[i].line;
        let mut keys = Vec::new();
        while i < tokens.len() && !is_open(&tokens[i]) {
            if is_close(&tokens[i]) {
                return Err(parse_error(path, tokens[i].line, "unexpected '}'"));
            }
            for k in tokens[i].text.split(',').filter(|k| !k.is_empty()) {
                keys.push(k.to_string());
            }
            i += 1;
        }
        if i == tokens.len() {
            return Err(parse_error(
                path,
                line,
                "server block without '{' (write e.g. \".:53 {\")",
            ));
        }
        if keys.is_empty() {
            return Err(parse_error(path, line, "server block without a zone"));
        }
        if keys[0].starts_with('(') {
            return Err(parse_error(path, line, "snippets are not supported"));
        }
        i += 1; // '{'
        let mut directives = Vec::new();
        loop {
            let Some(t) = tokens.get(i) else {
                return Err(parse_error(path, line, "server block not closed with '}'"));
            };
            if is_close(t) {
                i += 1;
                break;
            }
            let (d, next) = directive(path, &tokens, i, true)?;
            if d.name == "import" {
                return Err(parse_error(path, d.line, "import is not supported"));
            }
            directives.push(d);
            i = next;
        }
        blocks.push(ServerBlock {
            keys,
            line,
            directives,
        });
    }
    Ok(blocks)
}

/// The directive starting at token `i`: the tokens on its line, then a `{ }` block when the
/// line ends with `{` (only at the top level of a server block).
fn directive(
    path: &Path,
    tokens: &[Token],
    mut i: usize,
    top: bool,
) -> Result<(Directive, usize), ConfigError> {
    let first = &tokens[i];
    if is_open(first) {
        return Err(parse_error(path, first.line, "unexpected '{'"));
    }
    let mut d = Directive {
        name: first.text.clone(),
        line: first.line,
        args: vec![],
        block: vec![],
    };
    i += 1;
    while let Some(t) = tokens.get(i) {
        if t.line != d.line || is_close(t) {
            break;
        }
        if is_open(t) {
            if !top {
                return Err(parse_error(path, t.line, "nested blocks are not supported"));
            }
            i += 1;
            loop {
                let Some(t) = tokens.get(i) else {
                    return Err(parse_error(
                        path,
                        d.line,
                        format!("{}: block not closed with '}}'", d.name),
                    ));
                };
                if is_close(t) {
                    i += 1;
                    break;
                }
                let (sub, next) = directive(path, tokens, i, false)?;
                d.block.push(sub);
                i = next;
            }
            break;
        }
        d.args.push(t.text.clone());
        i += 1;
    }
    Ok((d, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/Corefile")
    }

    #[test]
    fn blocks_directives_and_sub_blocks() {
        let text = "# comment\ncluster.local:53 b.local {\n  errors\n  cache {\n    success 9984 30\n    denial 9984 5\n  }\n  forward . 10.0.0.10 { force_tcp }\n  log \"quoted arg\" # c\n}\n.:53 {\n}\n";
        let b = parse(p(), text).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].keys, vec!["cluster.local:53", "b.local"]);
        assert_eq!(b[0].line, 2);
        let d = &b[0].directives;
        assert_eq!(d[0].name, "errors");
        assert_eq!(d[1].name, "cache");
        assert_eq!(d[1].block[0].args, vec!["9984", "30"]);
        assert_eq!(d[1].block[1].line, 6);
        assert_eq!(d[2].args, vec![".", "10.0.0.10"]);
        assert_eq!(d[2].block[0].name, "force_tcp");
        assert_eq!(d[3].args, vec!["quoted arg"]);
        assert_eq!(b[1].keys, vec![".:53"]);
        assert!(b[1].directives.is_empty());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse(p(), ".:53 {\n  cache {\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "config file /etc/Corefile: line 2: cache: block not closed with '}'"
        );
        let e = parse(p(), ".:53\n").unwrap_err().to_string();
        assert!(e.contains("line 1: server block without '{'"), "{e}");
        let e = parse(p(), ".:53 {\n import x\n}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: import is not supported"), "{e}");
        let e = parse(p(), "(snip) {\n}\n").unwrap_err().to_string();
        assert!(e.contains("line 1: snippets are not supported"), "{e}");
        let e = parse(p(), "}\n").unwrap_err().to_string();
        assert!(e.contains("line 1: unexpected '}'"), "{e}");
        let e = parse(p(), ".:53 {\n log \"x\n}\n").unwrap_err().to_string();
        assert!(e.contains("line 2: unterminated quote"), "{e}");
    }

    fn pillars() -> Pillars {
        Pillars {
            local_ips: vec!["169.254.20.10".into(), "10.0.0.10".into()],
            cluster_dns: Some("10.0.0.20".into()),
            cluster_dns_var: "KUBE_DNS_UPSTREAM_SERVICE_HOST".into(),
            upstream_servers: vec![],
            prometheus: ":9253".into(),
        }
    }

    #[test]
    fn placeholders_are_filled_as_node_cache_fills_them() {
        let t = "a {\n bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__\n forward . __PILLAR__CLUSTER__DNS__\n forward . __PILLAR__UPSTREAM__SERVERS__\n prometheus __PROMETHEUS__ENDPOINT__\n}\n";
        let r = render(p(), t, &pillars()).unwrap();
        assert_eq!(
            r.text,
            "a {\n bind 169.254.20.10 10.0.0.10 \n forward . 10.0.0.20\n forward . /etc/resolv.conf\n prometheus :9253\n}\n"
        );
        assert!(r.custom_upstream_lines.is_empty());
        let mut pl = pillars();
        pl.upstream_servers = vec!["1.1.1.1".into(), "8.8.8.8:53".into()];
        let r = render(p(), t, &pl).unwrap();
        assert!(r.text.contains("forward . 1.1.1.1 8.8.8.8:53\n"));
        assert_eq!(r.custom_upstream_lines, vec![4]);
    }

    #[test]
    fn unfillable_placeholders_name_line_and_name() {
        let mut pl = pillars();
        pl.cluster_dns = None;
        let e = render(p(), "x\nforward . __PILLAR__CLUSTER__DNS__\n", &pl)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file /etc/Corefile: line 2: __PILLAR__CLUSTER__DNS__: KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"),
            "{e}"
        );
        let e = render(p(), "__PILLAR__DNS__DOMAIN__:53 {\n", &pillars())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1: __PILLAR__DNS__DOMAIN__: placeholder not filled"),
            "{e}"
        );
        let mut pl = pillars();
        pl.local_ips.clear();
        let e = render(p(), "bind __PILLAR__LOCAL__DNS__\n", &pl)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1: __PILLAR__LOCAL__DNS__: no -localip"),
            "{e}"
        );
    }
}
