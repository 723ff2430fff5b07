//! Resource usage of the node, its pods and their containers, read from the
//! cgroups the runtime puts pods in (`/tapestry/pod<uid>/<container id>`)
//! and from /proc, served as kubelet's `/metrics/resource`.
//!
//! Both cgroup layouts are read: v1 controllers (`cpuacct.usage`,
//! `memory.usage_in_bytes` less `total_inactive_file`), as on a hybrid
//! machine, and the unified v2 hierarchy (`cpu.stat` `usage_usec`,
//! `memory.current` less `inactive_file`) when no v1 controller has the
//! cgroup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// Cumulative CPU time (seconds) and working set (bytes) of one cgroup or
/// the node; either may be unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: Option<f64>,
    pub memory_working_set: Option<u64>,
}

/// Where the cgroup hierarchies are mounted.
#[derive(Clone, Debug)]
pub struct Roots {
    /// v1 `cpuacct` hierarchy (alone or joined with `cpu`).
    pub cpuacct: Option<PathBuf>,
    /// v1 `memory` hierarchy.
    pub memory: Option<PathBuf>,
    /// The unified (v2) hierarchy: `/sys/fs/cgroup` itself on a pure v2
    /// machine, `/sys/fs/cgroup/unified` on a hybrid one.
    pub unified: Option<PathBuf>,
}

impl Roots {
    /// The hierarchies under `base` (normally `/sys/fs/cgroup`).
    pub fn detect(base: &Path) -> Roots {
        if base.join("cgroup.controllers").exists() {
            return Roots {
                cpuacct: None,
                memory: None,
                unified: Some(base.to_path_buf()),
            };
        }
        let mut cpuacct = None;
        if let Ok(rd) = fs::read_dir(base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.split(',').any(|c| c == "cpuacct")
                    && e.path().join("cpuacct.usage").exists()
                {
                    cpuacct = Some(e.path());
                    break;
                }
            }
        }
        let memory = Some(base.join("memory")).filter(|p| p.join("memory.stat").exists());
        let unified = Some(base.join("unified")).filter(|p| p.join("cgroup.procs").exists());
        Roots {
            cpuacct,
            memory,
            unified,
        }
    }

    /// Usage of the cgroup at `rel` (e.g. `tapestry/pod<uid>`).
    pub fn usage(&self, rel: &str) -> Usage {
        let rel = rel.trim_start_matches('/');
        let v1_cpu = self
            .cpuacct
            .as_ref()
            .and_then(|r| fs::read_to_string(r.join(rel).join("cpuacct.usage")).ok())
            .and_then(|t| parse_cpuacct_usage(&t));
        let v2_dir = self.unified.as_ref().map(|r| r.join(rel));
        let cpu_seconds = v1_cpu.or_else(|| {
            v2_dir
                .as_ref()
                .and_then(|d| fs::read_to_string(d.join("cpu.stat")).ok())
                .and_then(|t| parse_cpu_stat(&t))
        });
        let v1_mem = self.memory.as_ref().and_then(|r| {
            let d = r.join(rel);
            let usage = fs::read_to_string(d.join("memory.usage_in_bytes")).ok()?;
            let stat = fs::read_to_string(d.join("memory.stat")).ok()?;
            working_set_v1(&usage, &stat)
        });
        let memory_working_set = v1_mem.or_else(|| {
            let d = v2_dir.as_ref()?;
            let current = fs::read_to_string(d.join("memory.current")).ok()?;
            let stat = fs::read_to_string(d.join("memory.stat")).ok()?;
            working_set_v2(&current, &stat)
        });
        Usage {
            cpu_seconds,
            memory_working_set,
        }
    }

    /// The names of the cgroups directly under `rel`, in any hierarchy.
    pub fn children(&self, rel: &str) -> Vec<String> {
        let rel = rel.trim_start_matches('/');
        let mut names: Vec<String> = [&self.cpuacct, &self.memory, &self.unified]
            .into_iter()
            .flatten()
            .filter_map(|r| fs::read_dir(r.join(rel)).ok())
            .flat_map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// `cpuacct.usage`: nanoseconds.
pub fn parse_cpuacct_usage(text: &str) -> Option<f64> {
    text.trim().parse::<u64>().ok().map(|ns| ns as f64 / 1e9)
}

/// v2 `cpu.stat`: the `usage_usec` line, microseconds.
pub fn parse_cpu_stat(text: &str) -> Option<f64> {
    stat_value(text, "usage_usec").map(|us| us as f64 / 1e6)
}

/// The value of `key` in a `key value` per line file (memory.stat, cpu.stat).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// v1: usage less the inactive page cache (as cAdvisor counts it), never
/// below zero.
pub fn working_set_v1(usage: &str, stat: &str) -> Option<u64> {
    let usage: u64 = usage.trim().parse().ok()?;
    let inactive = stat_value(stat, "total_inactive_file").unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// v2: `memory.current` less `inactive_file`.
pub fn working_set_v2(current: &str, stat: &str) -> Option<u64> {
    let current: u64 = current.trim().parse().ok()?;
    let inactive = stat_value(stat, "inactive_file").unwrap_or(0);
    Some(current.saturating_sub(inactive))
}

/// /proc/stat's first line: busy time (all but idle and iowait) in seconds,
/// at `ticks` per second.
pub fn parse_proc_stat(text: &str, ticks: f64) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice).
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| *v)
        .sum();
    Some(busy as f64 / ticks)
}

/// /proc/meminfo: total less free less inactive page cache, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let kb = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let total = kb("MemTotal")?;
    let free = kb("MemFree")?;
    let inactive = kb("Inactive(file)").unwrap_or(0);
    Some(total.saturating_sub(free).saturating_sub(inactive) * 1024)
}

/// The node's usage from /proc.
pub fn node_usage() -> Usage {
    // USER_HZ is 100 on every Linux architecture Tapestry runs on.
    let ticks = 100.0;
    Usage {
        cpu_seconds: fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t, ticks)),
        memory_working_set: fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t)),
    }
}

/// One pod on this node as the metrics name it.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A pod's usage and its containers', by container name.
#[derive(Clone, Debug)]
pub struct PodUsage {
    pub pod: PodRef,
    pub usage: Usage,
    pub containers: BTreeMap<String, Usage>,
}

/// The container name and attempt of a container cgroup named
/// `<uid>-<name>-<attempt>`.
pub fn container_of(uid: &str, cgroup: &str) -> Option<(String, u32)> {
    let rest = cgroup.strip_prefix(uid)?.strip_prefix('-')?;
    let (name, attempt) = rest.rsplit_once('-')?;
    Some((name.to_string(), attempt.parse().ok()?)).filter(|(n, _)| !n.is_empty())
}

/// Usage of `pods` and their (latest) containers.
pub fn pods_usage(roots: &Roots, pods: &[PodRef]) -> Vec<PodUsage> {
    pods.iter()
        .filter_map(|p| {
            let rel = format!("tapestry/pod{}", p.uid);
            let children = roots.children(&rel);
            let mut latest: BTreeMap<String, (u32, String)> = BTreeMap::new();
            for c in children {
                if let Some((name, attempt)) = container_of(&p.uid, &c) {
                    let e = latest.entry(name).or_insert((attempt, c.clone()));
                    if attempt >= e.0 {
                        *e = (attempt, c);
                    }
                }
            }
            let usage = roots.usage(&rel);
            if usage == Usage::default() && latest.is_empty() {
                return None;
            }
            let containers = latest
                .into_iter()
                .map(|(name, (_, dir))| (name, roots.usage(&format!("{rel}/{dir}"))))
                .collect();
            Some(PodUsage {
                pod: p.clone(),
                usage,
                containers,
            })
        })
        .collect()
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics/resource` text (Prometheus exposition format 0.0.4, with
/// millisecond timestamps), as kubelet writes it.
pub fn render(node: Usage, pods: &[PodUsage], timestamp_ms: i64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v} {timestamp_ms}");
        }
    };
    let container_labels = |p: &PodRef, c: &str| {
        format!(
            "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}",
            label(c),
            label(&p.namespace),
            label(&p.name)
        )
    };
    let pod_labels = |p: &PodRef| {
        format!(
            "{{namespace=\"{}\",pod=\"{}\"}}",
            label(&p.namespace),
            label(&p.name)
        )
    };
    let containers = |f: fn(&Usage) -> Option<f64>| -> Vec<(String, f64)> {
        pods.iter()
            .flat_map(|p| {
                p.containers
                    .iter()
                    .filter_map(|(c, u)| f(u).map(|v| (container_labels(&p.pod, c), v)))
            })
            .collect()
    };
    let pod_samples = |f: fn(&Usage) -> Option<f64>| -> Vec<(String, f64)> {
        pods.iter()
            .filter_map(|p| f(&p.usage).map(|v| (pod_labels(&p.pod), v)))
            .collect()
    };
    let cpu: fn(&Usage) -> Option<f64> = |u| u.cpu_seconds;
    let mem: fn(&Usage) -> Option<f64> = |u| u.memory_working_set.map(|b| b as f64);
    family(
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the container in core-seconds",
        "counter",
        containers(cpu),
    );
    family(
        "container_memory_working_set_bytes",
        "Current working set of the container in bytes",
        "gauge",
        containers(mem),
    );
    family(
        "node_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the node in core-seconds",
        "counter",
        cpu(&node)
            .map(|v| vec![(String::new(), v)])
            .unwrap_or_default(),
    );
    family(
        "node_memory_working_set_bytes",
        "Current working set of the node in bytes",
        "gauge",
        mem(&node)
            .map(|v| vec![(String::new(), v)])
            .unwrap_or_default(),
    );
    family(
        "pod_cpu_usage_seconds_total",
        "Cumulative cpu time consumed by the pod in core-seconds",
        "counter",
        pod_samples(cpu),
    );
    family(
        "pod_memory_working_set_bytes",
        "Current working set of the pod in bytes",
        "gauge",
        pod_samples(mem),
    );
    let _ = writeln!(
        out,
        "# HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise"
    );
    let _ = writeln!(out, "# TYPE scrape_error gauge");
    let _ = writeln!(out, "scrape_error 0");
    out
}

/// The whole `/metrics/resource` body for the pods given, read now.
pub fn resource_metrics(pods: &[PodRef]) -> String {
    // The hierarchies do not change while the node runs: found once.
    static ROOTS: std::sync::OnceLock<Roots> = std::sync::OnceLock::new();
    let roots = ROOTS.get_or_init(|| Roots::detect(Path::new("/sys/fs/cgroup")));
    let node = node_usage();
    let pods = pods_usage(roots, pods);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    render(node, &pods, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9d3c4e-1111-2222-3333-444455556666";

    #[test]
    fn cgroup_files() {
        assert_eq!(parse_cpuacct_usage("2500000000\n"), Some(2.5));
        assert_eq!(parse_cpuacct_usage("x"), None);
        let cpu_stat = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n";
        assert_eq!(parse_cpu_stat(cpu_stat), Some(1.5));
        assert_eq!(parse_cpu_stat("user_usec 3\n"), None);
        let v1_stat = "cache 4096\ninactive_file 100\ntotal_cache 8192\ntotal_inactive_file 4096\n";
        assert_eq!(working_set_v1("10000\n", v1_stat), Some(10000 - 4096));
        assert_eq!(working_set_v1("1000\n", v1_stat), Some(0));
        let v2_stat = "anon 123\nfile 5000\ninactive_file 2000\nactive_file 3000\n";
        assert_eq!(working_set_v2("9000\n", v2_stat), Some(7000));
        assert_eq!(working_set_v2("max\n", v2_stat), None);
    }

    #[test]
    fn proc_files() {
        let stat = "cpu  100 20 30 4000 50 6 7 8 9 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n";
        // user+nice+system+irq+softirq+steal = 100+20+30+6+7+8
        assert_eq!(parse_proc_stat(stat, 100.0), Some(1.71));
        assert_eq!(parse_proc_stat("intr 1 2\n", 100.0), None);
        let meminfo = "MemTotal:       16000 kB\nMemFree:         4000 kB\nMemAvailable:   9000 kB\nInactive(file):  2000 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some(10000 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn container_names() {
        assert_eq!(
            container_of(UID, &format!("{UID}-web-server-3")),
            Some(("web-server".to_string(), 3))
        );
        assert_eq!(container_of(UID, &format!("{UID}-web")), None);
        assert_eq!(container_of(UID, "other-web-0"), None);
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn hybrid_and_unified_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        // Hybrid: v1 cpu,cpuacct and memory, plus the unified hierarchy.
        let pod = format!("tapestry/pod{UID}");
        let acct = base.join("cpu,cpuacct");
        write(&acct.join("cpuacct.usage"), "0\n");
        write(&acct.join(&pod).join("cpuacct.usage"), "3000000000\n");
        for (c, ns) in [("0", "1000000000"), ("1", "2000000000")] {
            write(
                &acct.join(&pod).join(format!("{UID}-app-{c}/cpuacct.usage")),
                &format!("{ns}\n"),
            );
        }
        let mem = base.join("memory");
        write(&mem.join("memory.stat"), "");
        write(&mem.join(&pod).join("memory.usage_in_bytes"), "5000\n");
        write(
            &mem.join(&pod).join("memory.stat"),
            "total_inactive_file 1000\n",
        );
        write(&base.join("unified/cgroup.procs"), "");
        // Only the unified hierarchy has the sidecar's cgroup.
        let side = base
            .join("unified")
            .join(&pod)
            .join(format!("{UID}-side-0"));
        write(&side.join("cpu.stat"), "usage_usec 250000\n");
        write(&side.join("memory.current"), "800\n");
        write(&side.join("memory.stat"), "inactive_file 300\n");

        let roots = Roots::detect(base);
        assert_eq!(roots.cpuacct, Some(acct.clone()));
        let pods = vec![PodRef {
            namespace: "default".into(),
            name: "web".into(),
            uid: UID.into(),
        }];
        let usage = pods_usage(&roots, &pods);
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].usage.cpu_seconds, Some(3.0));
        assert_eq!(usage[0].usage.memory_working_set, Some(4000));
        let names: Vec<&str> = usage[0].containers.keys().map(String::as_str).collect();
        assert_eq!(names, ["app", "side"]);
        // The latest attempt counts.
        assert_eq!(usage[0].containers["app"].cpu_seconds, Some(2.0));
        assert_eq!(usage[0].containers["side"].cpu_seconds, Some(0.25));
        assert_eq!(usage[0].containers["side"].memory_working_set, Some(500));

        // Pure v2.
        let dir2 = tempfile::tempdir().unwrap();
        write(&dir2.path().join("cgroup.controllers"), "cpu memory\n");
        let pod2 = dir2.path().join(&pod);
        write(&pod2.join("cpu.stat"), "usage_usec 4000000\n");
        write(&pod2.join("memory.current"), "100\n");
        write(&pod2.join("memory.stat"), "inactive_file 40\n");
        let roots = Roots::detect(dir2.path());
        assert!(roots.cpuacct.is_none());
        let usage = pods_usage(&roots, &pods);
        assert_eq!(usage[0].usage.cpu_seconds, Some(4.0));
        assert_eq!(usage[0].usage.memory_working_set, Some(60));
        // A pod without cgroups is left out.
        let gone = PodRef {
            uid: "nope".into(),
            ..pods[0].clone()
        };
        assert!(pods_usage(&roots, &[gone]).is_empty());
    }

    #[test]
    fn exposition_text() {
        let pods = vec![PodUsage {
            pod: PodRef {
                namespace: "ns".into(),
                name: "p\"q".into(),
                uid: UID.into(),
            },
            usage: Usage {
                cpu_seconds: Some(1.5),
                memory_working_set: Some(2048),
            },
            containers: [(
                "c".to_string(),
                Usage {
                    cpu_seconds: Some(1.25),
                    memory_working_set: None,
                },
            )]
            .into(),
        }];
        let node = Usage {
            cpu_seconds: Some(10.0),
            memory_working_set: Some(1 << 20),
        };
        let text = render(node, &pods, 1700000000000);
        assert!(text.contains(
            "container_cpu_usage_seconds_total{container=\"c\",namespace=\"ns\",pod=\"p\\\"q\"} 1.25 1700000000000\n"
        ));
        assert!(text.contains("node_cpu_usage_seconds_total 10 1700000000000\n"));
        assert!(text.contains("node_memory_working_set_bytes 1048576 1700000000000\n"));
        assert!(text.contains(
            "pod_memory_working_set_bytes{namespace=\"ns\",pod=\"p\\\"q\"} 2048 1700000000000\n"
        ));
        assert!(text.contains("# TYPE pod_cpu_usage_seconds_total counter\n"));
        assert!(!text.contains("container_memory_working_set_bytes{"));
    }
}
