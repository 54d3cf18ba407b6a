//! What a Service asks of Sluice, read from its spec and annotations. Pure.
//!
//! Sluice reads its own annotations (`sluice.dev/…`) and, for drop-in migration, MetalLB's two
//! spellings (`metallb.io/…`, `metallb.universe.tf/…`). When more than one spelling is set they
//! must agree. Every error names the field or annotation and the value.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

/// Sluice's `spec.loadBalancerClass`.
pub const LOAD_BALANCER_CLASS: &str = "sluice.dev/lb";

const PREFIXES: [&str; 3] = ["sluice.dev/", "metallb.io/", "metallb.universe.tf/"];

/// An address family a Service wants an IP of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }
}

/// A service port, for the sharing rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub port: i32,
    pub protocol: String,
}

/// Everything the allocation needs to know about one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The families wanted, in the Service's order.
    pub families: Vec<Family>,
    /// `RequireDualStack`: both families or nothing.
    pub require_all_families: bool,
    /// Specific IPs asked for (at most one per family).
    pub ips: Vec<IpAddr>,
    pub pool: Option<String>,
    /// Services with the same key and no clashing port may share an IP.
    pub sharing_key: Option<String>,
    pub ports: BTreeSet<PortKey>,
    pub namespace: String,
}

/// Why a Service's request cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RequestError {
    /// `spec.loadBalancerIP`, `annotation metallb.io/address-pool`, ...
    pub field: String,
    pub value: String,
    pub message: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}: {}", self.field, self.value, self.message)
    }
}

fn error(field: &str, value: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        field: field.to_string(),
        value: value.to_string(),
        message: message.into(),
    }
}

/// Whether Sluice handles this Service: type LoadBalancer, and Sluice's class, or no class when
/// `classless_is_ours`.
pub fn is_ours(service: &Service, classless_is_ours: bool) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        None => classless_is_ours,
        Some(class) => class == LOAD_BALANCER_CLASS,
    }
}

/// The one value of an annotation across its spellings: (annotation name, value).
fn annotation(service: &Service, key: &str) -> Result<Option<(String, String)>, RequestError> {
    let Some(annotations) = &service.metadata.annotations else {
        return Ok(None);
    };
    let mut found: Option<(String, String)> = None;
    for prefix in PREFIXES {
        // Looked up without building "prefix + key" (a Service has few annotations; this runs
        // for every key of every Service on every pass).
        let hit = annotations
            .iter()
            .find(|(k, _)| k.strip_prefix(prefix) == Some(key));
        if let Some((name, value)) = hit {
            let name = name.clone();
            let value = value.trim().to_string();
            match &found {
                Some((first, v)) if *v != value => {
                    return Err(error(
                        &format!("annotation {name}"),
                        &value,
                        format!("disagrees with {first} ({v:?}); set one"),
                    ))
                }
                Some(_) => {}
                None => found = Some((name, value)),
            }
        }
    }
    Ok(found)
}

/// Reads the request of a Service that [`is_ours`].
pub fn read(service: &Service) -> Result<Request, RequestError> {
    let no_spec = k8s_openapi::api::core::v1::ServiceSpec::default();
    let spec = service.spec.as_ref().unwrap_or(&no_spec);
    let namespace = service.metadata.namespace.clone().unwrap_or_default();

    // Requested IPs: the annotation, or the deprecated spec.loadBalancerIP.
    let mut ips: Vec<IpAddr> = Vec::new();
    let annotated = annotation(service, "loadBalancerIPs")?;
    let legacy = spec
        .load_balancer_ip
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some((name, value)) = &annotated {
        let field = format!("annotation {name}");
        for part in value.split(',').map(str::trim) {
            let ip: IpAddr = part
                .parse()
                .map_err(|_| error(&field, part, "not an IP address"))?;
            if ips.iter().any(|x| Family::of(*x) == Family::of(ip)) {
                return Err(error(&field, value, "names two IPs of one family"));
            }
            ips.push(ip);
        }
        if ips.is_empty() {
            return Err(error(&field, value, "names no IP"));
        }
        if let Some(l) = legacy {
            if !ips.iter().any(|ip| ip.to_string() == l) {
                return Err(error(
                    "spec.loadBalancerIP",
                    l,
                    format!("disagrees with {name} ({value:?}); set one"),
                ));
            }
        }
    } else if let Some(l) = legacy {
        ips.push(
            l.parse()
                .map_err(|_| error("spec.loadBalancerIP", l, "not an IP address"))?,
        );
    }

    // Families: spec.ipFamilies and ipFamilyPolicy; requested IPs must fit them.
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    let mut families: Vec<Family> = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        let family = match f.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            other => {
                return Err(error(
                    &format!("spec.ipFamilies[{i}]"),
                    other,
                    "neither IPv4 nor IPv6",
                ))
            }
        };
        if !families.contains(&family) {
            families.push(family);
        }
    }
    let dual = match policy {
        "SingleStack" => false,
        "PreferDualStack" | "RequireDualStack" => true,
        other => {
            return Err(error(
                "spec.ipFamilyPolicy",
                other,
                "not SingleStack, PreferDualStack or RequireDualStack",
            ))
        }
    };
    if families.is_empty() {
        // The API server fills ipFamilies; without it, follow the requested IPs, else IPv4.
        families = ips.iter().map(|ip| Family::of(*ip)).collect();
        if families.is_empty() {
            families.push(Family::V4);
        }
    }
    if dual {
        for f in [Family::V4, Family::V6] {
            if !families.contains(&f) {
                families.push(f);
            }
        }
    } else {
        families.truncate(1);
    }
    for ip in &ips {
        if !families.contains(&Family::of(*ip)) {
            let field = annotated
                .as_ref()
                .map(|(n, _)| format!("annotation {n}"))
                .unwrap_or_else(|| "spec.loadBalancerIP".to_string());
            return Err(error(
                &field,
                &ip.to_string(),
                format!("is not of the Service's families ({families:?})"),
            ));
        }
    }

    let pool = annotation(service, "address-pool")?
        .map(|(name, value)| {
            if value.is_empty() {
                Err(error(
                    &format!("annotation {name}"),
                    &value,
                    "names no pool",
                ))
            } else {
                Ok(value)
            }
        })
        .transpose()?;
    let sharing_key = annotation(service, "allow-shared-ip")?
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty());
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| PortKey {
            port: p.port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
        })
        .collect();

    Ok(Request {
        families,
        require_all_families: policy == "RequireDualStack",
        ips,
        pool,
        sharing_key,
        ports,
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn service(annotations: &[(&str, &str)], spec: ServiceSpec) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("web".into());
        s.metadata.namespace = Some("shop".into());
        if !annotations.is_empty() {
            s.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        s.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..spec
        });
        s
    }

    fn plain(annotations: &[(&str, &str)]) -> Service {
        service(annotations, ServiceSpec::default())
    }

    #[test]
    fn only_load_balancer_services_of_our_class_or_classless_by_choice_are_ours() {
        let classless = plain(&[]);
        assert!(is_ours(&classless, true));
        assert!(!is_ours(&classless, false));
        let ours = service(
            &[],
            ServiceSpec {
                load_balancer_class: Some(LOAD_BALANCER_CLASS.into()),
                ..Default::default()
            },
        );
        assert!(is_ours(&ours, false));
        let theirs = service(
            &[],
            ServiceSpec {
                load_balancer_class: Some("metallb.io/metallb".into()),
                ..Default::default()
            },
        );
        assert!(!is_ours(&theirs, true));
        let mut cluster_ip = plain(&[]);
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(!is_ours(&cluster_ip, true));
    }

    #[test]
    fn every_spelling_of_the_annotations_is_read() {
        for prefix in PREFIXES {
            let s = plain(&[
                (&format!("{prefix}loadBalancerIPs"), "192.0.2.10"),
                (&format!("{prefix}address-pool"), "prod"),
                (&format!("{prefix}allow-shared-ip"), "web"),
            ]);
            let r = read(&s).unwrap();
            assert_eq!(r.ips, ["192.0.2.10".parse::<IpAddr>().unwrap()], "{prefix}");
            assert_eq!(r.pool.as_deref(), Some("prod"));
            assert_eq!(r.sharing_key.as_deref(), Some("web"));
            assert_eq!(r.namespace, "shop");
        }
    }

    #[test]
    fn two_spellings_that_disagree_are_an_error_naming_both() {
        let s = plain(&[
            ("sluice.dev/address-pool", "prod"),
            ("metallb.universe.tf/address-pool", "test"),
        ]);
        let e = read(&s).unwrap_err().to_string();
        assert!(
            e.contains("metallb.universe.tf/address-pool") && e.contains("sluice.dev/address-pool"),
            "{e}"
        );
        let same = plain(&[
            ("sluice.dev/address-pool", "prod"),
            ("metallb.io/address-pool", "prod"),
        ]);
        assert_eq!(read(&same).unwrap().pool.as_deref(), Some("prod"));
    }

    #[test]
    fn garbage_ips_name_the_annotation_or_field_and_the_value() {
        let e = read(&plain(&[(
            "metallb.io/loadBalancerIPs",
            "192.0.2.10, banana",
        )]))
        .unwrap_err();
        assert_eq!(e.field, "annotation metallb.io/loadBalancerIPs");
        assert_eq!(e.value, "banana");
        let e = read(&plain(&[(
            "sluice.dev/loadBalancerIPs",
            "192.0.2.10,192.0.2.11",
        )]))
        .unwrap_err();
        assert!(e.message.contains("two IPs of one family"));
        let legacy = service(
            &[],
            ServiceSpec {
                load_balancer_ip: Some("300.1.1.1".into()),
                ..Default::default()
            },
        );
        let e = read(&legacy).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("spec.loadBalancerIP", "300.1.1.1")
        );
    }

    #[test]
    fn the_deprecated_load_balancer_ip_field_still_works() {
        let s = service(
            &[],
            ServiceSpec {
                load_balancer_ip: Some("2001:db8::10".into()),
                ..Default::default()
            },
        );
        let r = read(&s).unwrap();
        assert_eq!(r.ips, ["2001:db8::10".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.families, [Family::V6]);
    }

    #[test]
    fn families_follow_ip_families_and_the_policy() {
        let dual = |policy: &str, families: &[&str]| {
            service(
                &[],
                ServiceSpec {
                    ip_family_policy: Some(policy.into()),
                    ip_families: Some(families.iter().map(|f| f.to_string()).collect()),
                    ..Default::default()
                },
            )
        };
        let r = read(&dual("SingleStack", &["IPv6"])).unwrap();
        assert_eq!(
            (r.families, r.require_all_families),
            (vec![Family::V6], false)
        );
        let r = read(&dual("PreferDualStack", &["IPv6", "IPv4"])).unwrap();
        assert_eq!(r.families, [Family::V6, Family::V4]);
        let r = read(&dual("RequireDualStack", &["IPv4"])).unwrap();
        assert_eq!(
            (r.families, r.require_all_families),
            (vec![Family::V4, Family::V6], true)
        );
        let e = read(&dual("Sometimes", &["IPv4"])).unwrap_err();
        assert_eq!(e.field, "spec.ipFamilyPolicy");
        let mut single_v4 = dual("SingleStack", &["IPv4"]);
        single_v4.metadata.annotations = Some(
            [(
                "sluice.dev/loadBalancerIPs".to_string(),
                "2001:db8::1".to_string(),
            )]
            .into(),
        );
        let e = read(&single_v4).unwrap_err();
        assert!(e.message.contains("families"), "{e}");
    }

    #[test]
    fn ports_default_to_tcp_for_the_sharing_rules() {
        let s = service(
            &[],
            ServiceSpec {
                ports: Some(vec![
                    ServicePort {
                        port: 80,
                        ..Default::default()
                    },
                    ServicePort {
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            },
        );
        let ports: Vec<(i32, String)> = read(&s)
            .unwrap()
            .ports
            .into_iter()
            .map(|p| (p.port, p.protocol))
            .collect();
        assert_eq!(ports, [(53, "UDP".into()), (80, "TCP".into())]);
    }
}
