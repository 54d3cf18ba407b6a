//! An in-process fake of the Kubernetes API server, speaking HTTP/1.1 on 127.0.0.1, for
//! driving `sluice controller` (and its `kube` client) end to end where a real kube-apiserver
//! cannot run.
//!
//! What it does, as the real one does:
//! - paths: `/api/v1/...` and `/apis/GROUP/VERSION/...`, namespaced and cluster-scoped, list
//!   across all namespaces (`/api/v1/services`);
//! - list (with `metadata.resourceVersion`), get, create (`POST`, 409 `AlreadyExists`),
//!   replace (`PUT`, 409 `Conflict` when `metadata.resourceVersion` is stale), delete;
//! - watch (`?watch=true&resourceVersion=N`): ADDED/MODIFIED/DELETED events after N, as
//!   newline-delimited JSON in a chunked response, until `timeoutSeconds`;
//! - PATCH with JSON merge patch (RFC 7386); strategic-merge and apply patches are applied as
//!   merge patches (enough for the status writes tested here, not a general SSA);
//! - the `status` subresource for Services and sluice.dev objects: `/status` writes change only
//!   `status`, writes to the object itself never change `status`; `metadata.generation` grows
//!   when `spec` changes;
//! - one resourceVersion counter for everything, `uid` and `creationTimestamp` on create.
//!
//! - outages on demand ([`FakeApi::set_outage`]): refusing connections (every open connection
//!   cut, connect refused) or hanging (requests read and never answered, watches silent) until
//!   the test ends them.
//!
//! What it does not do: authentication, RBAC, admission, validation against schemas, label or
//! field selectors, pagination (`limit` is ignored: every list is one page).
//!
//! Tests act on it directly ([`FakeApi::create`], [`FakeApi::patch`], ...), through the same
//! code the HTTP handlers run, and can read the log of requests it served.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// Which collection: the API prefix (`api/v1`, `apis/sluice.dev/v1alpha1`) and the plural.
type Collection = (String, String);

#[derive(Debug, Clone)]
struct WatchEvent {
    rv: u64,
    collection: Collection,
    namespace: String,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Collection, BTreeMap<(String, String), Value>>,
    log: Vec<WatchEvent>,
    requests: Vec<String>,
    /// (verb, resource) pairs answered 403 Forbidden, as RBAC would.
    forbidden: Vec<(&'static str, String)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stopping: AtomicBool,
    outage: Mutex<Outage>,
    /// Every connection accepted, to cut them when an outage refuses.
    connections: Mutex<Vec<TcpStream>>,
    /// The listening socket's descriptor (-1 while closed).
    listening: std::sync::atomic::AtomicI32,
}

/// An outage of the API server, as a test makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Serving.
    None,
    /// Every connection is cut and new ones are refused (the listening socket stops
    /// listening: connect gets ECONNREFUSED), as when the API server is down.
    Refuse,
    /// Connections are accepted and requests read, but nothing is answered and watches send
    /// nothing until the outage ends, as when the API server or etcd hangs.
    Hang,
}

/// The fake API server; stops serving watches when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    address: std::net::SocketAddr,
}

/// ioctl: a socket's network namespace, as a new file descriptor.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Binds `address` again from a thread that entered `netns` (a file descriptor of it).
fn listen_in(netns: libc::c_int, address: std::net::SocketAddr) -> Option<TcpListener> {
    std::thread::spawn(move || {
        if netns >= 0 && unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        TcpListener::bind(address).ok()
    })
    .join()
    .ok()
    .flatten()
}

/// An error as the API server reports it (a `Status` object).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    fn body(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// A parsed resource path.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    collection: Collection,
    /// `None`: every namespace (or a cluster-scoped kind).
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Result<Target, ApiError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return Err(ApiError::new(404, "NotFound", format!("no API at {path}"))),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(name.to_string()), false),
        [plural, name, "status"] => (plural, Some(name.to_string()), true),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("no resource at {path}"),
            ))
        }
    };
    Ok(Target {
        collection: (prefix, plural.to_string()),
        namespace,
        name,
        status,
    })
}

fn has_status_subresource(c: &Collection) -> bool {
    c.0.starts_with("apis/sluice.dev/") || c.1 == "services"
}

fn list_kind(c: &Collection) -> String {
    let kind = match c.1.as_str() {
        "services" => "Service",
        "namespaces" => "Namespace",
        "leases" => "Lease",
        "events" => "Event",
        "ipaddresspools" => "IPAddressPool",
        "l2advertisements" => "L2Advertisement",
        "bgppeers" => "BGPPeer",
        "bgpadvertisements" => "BGPAdvertisement",
        "bfdprofiles" => "BFDProfile",
        "endpointslices" => "EndpointSlice",
        "nodes" => "Node",
        other => other,
    };
    format!("{kind}List")
}

fn api_version(c: &Collection) -> String {
    c.0.trim_start_matches("apis/")
        .trim_start_matches("api/")
        .to_string()
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, target: &Target, type_: &'static str, object: &Value) {
        let rv = self.rv;
        self.log.push(WatchEvent {
            rv,
            collection: target.collection.clone(),
            namespace: target.namespace.clone().unwrap_or_default(),
            type_,
            object: object.clone(),
        });
    }

    fn key(target: &Target) -> Result<(String, String), ApiError> {
        let name = target
            .name
            .clone()
            .ok_or_else(|| ApiError::new(405, "MethodNotAllowed", "a name is needed"))?;
        Ok((target.namespace.clone().unwrap_or_default(), name))
    }

    fn get(&self, target: &Target) -> Result<Value, ApiError> {
        let key = Self::key(target)?;
        self.objects
            .get(&target.collection)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", target.collection.1, key.1),
                )
            })
    }

    fn list(&self, target: &Target) -> Value {
        let items: Vec<Value> = self
            .objects
            .get(&target.collection)
            .into_iter()
            .flatten()
            .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|want| want == ns))
            .map(|(_, o)| o.clone())
            .collect();
        json!({
            "kind": list_kind(&target.collection),
            "apiVersion": api_version(&target.collection),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    fn create(&mut self, target: &Target, mut object: Value) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body is not an object",
            ));
        }
        let meta = object
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert(json!({}));
        if meta.get("name").and_then(Value::as_str).is_none() {
            let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.name: Required value",
                ));
            };
            let name = format!("{prefix}{:05}", self.rv + 1);
            meta["name"] = json!(name);
        }
        let name = meta["name"].as_str().unwrap().to_string();
        let ns = target.namespace.clone().unwrap_or_default();
        if self
            .objects
            .get(&target.collection)
            .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", target.collection.1),
            ));
        }
        let rv = self.next_rv();
        if !ns.is_empty() {
            meta["namespace"] = json!(ns);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        meta["generation"] = json!(1);
        let target = Target {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            ..target.clone()
        };
        self.objects
            .entry(target.collection.clone())
            .or_default()
            .insert((ns, name), object.clone());
        self.record(&target, "ADDED", &object);
        Ok(object)
    }

    /// Stores `new` as the object's next version, with the subresource rules.
    fn update(&mut self, target: &Target, mut new: Value) -> Result<Value, ApiError> {
        let old = self.get(target)?;
        if has_status_subresource(&target.collection) {
            let status = if target.status {
                new.get("status").cloned()
            } else {
                old.get("status").cloned()
            };
            if target.status {
                // Only status changes through /status.
                let mut kept = old.clone();
                match status {
                    Some(s) => kept["status"] = s,
                    None => {
                        kept.as_object_mut().unwrap().remove("status");
                    }
                }
                new = kept;
            } else {
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
        }
        for field in ["uid", "creationTimestamp", "namespace", "name"] {
            if let Some(v) = old["metadata"].get(field) {
                new["metadata"][field] = v.clone();
            }
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let spec_changed = old.get("spec") != new.get("spec");
        new["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = Self::key(target)?;
        self.objects
            .get_mut(&target.collection)
            .unwrap()
            .insert(key, new.clone());
        self.record(target, "MODIFIED", &new);
        Ok(new)
    }

    fn replace(&mut self, target: &Target, new: Value) -> Result<Value, ApiError> {
        let old = self.get(target)?;
        let sent = new["metadata"]["resourceVersion"].as_str();
        if sent.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    target.collection.1,
                    target.name.as_deref().unwrap_or_default()
                ),
            ));
        }
        self.update(target, new)
    }

    fn patch(&mut self, target: &Target, patch: &Value) -> Result<Value, ApiError> {
        let mut object = self.get(target)?;
        let sent = patch["metadata"]["resourceVersion"].as_str();
        if sent.is_some_and(|rv| Some(rv) != object["metadata"]["resourceVersion"].as_str()) {
            return Err(ApiError::new(
                409,
                "Conflict",
                "the object has been modified",
            ));
        }
        merge_patch(&mut object, patch);
        self.update(target, object)
    }

    fn delete(&mut self, target: &Target) -> Result<Value, ApiError> {
        let old = self.get(target)?;
        let key = Self::key(target)?;
        self.objects
            .get_mut(&target.collection)
            .unwrap()
            .remove(&key);
        self.next_rv();
        let mut gone = old.clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(target, "DELETED", &gone);
        Ok(old)
    }
}

impl FakeApi {
    /// Starts serving on a free port of 127.0.0.1.
    pub fn start() -> FakeApi {
        Self::serve(TcpListener::bind("127.0.0.1:0").expect("bind the fake API server"))
    }

    /// Serves on a listener bound elsewhere, e.g. inside a test's network namespace (bound
    /// from a thread that entered it) so that processes in other namespaces reach it.
    pub fn serve(listener: TcpListener) -> FakeApi {
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            outage: Mutex::new(Outage::None),
            connections: Mutex::new(Vec::new()),
            listening: std::sync::atomic::AtomicI32::new(-1),
        });
        let s = shared.clone();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // The listener's network namespace, to listen again in it after an outage that refuses.
        let netns = unsafe { libc::ioctl(fd, SIOCGSKNS) };
        std::thread::spawn(move || {
            let mut listener = Some(listener);
            loop {
                let accepted = match &listener {
                    Some(l) => l.accept(),
                    None => Err(std::io::ErrorKind::NotConnected.into()),
                };
                if s.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok((stream, _)) = accepted else {
                    if *s.outage.lock().unwrap() == Outage::Refuse {
                        // Closed: connect is refused until the outage ends.
                        listener = None;
                        s.listening.store(-1, Ordering::SeqCst);
                    } else if listener.is_none() {
                        listener = listen_in(netns, address);
                        s.listening.store(
                            listener
                                .as_ref()
                                .map_or(-1, std::os::fd::AsRawFd::as_raw_fd),
                            Ordering::SeqCst,
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                if let Ok(clone) = stream.try_clone() {
                    s.connections.lock().unwrap().push(clone);
                }
                let s = s.clone();
                std::thread::spawn(move || serve_connection(stream, &s));
            }
            if netns >= 0 {
                unsafe { libc::close(netns) };
            }
        });
        shared.listening.store(fd, Ordering::SeqCst);
        FakeApi { shared, address }
    }

    /// Starts or ends an outage (see [`Outage`]).
    pub fn set_outage(&self, outage: Outage) {
        let before = std::mem::replace(&mut *self.shared.outage.lock().unwrap(), outage);
        if before == outage {
            return;
        }
        if outage == Outage::Refuse {
            // Wakes the accept loop, which closes the listener; it listens again (same
            // address, same network namespace) when the outage ends.
            let fd = self.shared.listening.load(Ordering::SeqCst);
            if fd >= 0 {
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            for c in self.shared.connections.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.shared.listening.load(Ordering::SeqCst) >= 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if before == Outage::Refuse {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.shared.listening.load(Ordering::SeqCst) < 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.shared.changed.notify_all();
    }

    fn wait_while_hanging(shared: &Shared) {
        while *shared.outage.lock().unwrap() == Outage::Hang
            && !shared.stopping.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Writes a kubeconfig that points at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).expect("write the kubeconfig");
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.shared.state.lock().unwrap();
        let out = f(&mut state);
        self.shared.changed.notify_all();
        out
    }

    /// Creates an object in a collection path (`/api/v1/namespaces/default/services`).
    pub fn create(&self, collection: &str, object: Value) -> Result<Value, ApiError> {
        let target = parse_path(collection)?;
        self.with(|s| s.create(&target, object))
    }

    /// Reads one object (`/api/v1/namespaces/default/services/web`).
    pub fn get(&self, path: &str) -> Option<Value> {
        let target = parse_path(path).ok()?;
        self.with(|s| s.get(&target).ok())
    }

    /// Lists a collection path: the items.
    /// How many objects of a collection satisfy `f`, without copying them (a cheap poll of a
    /// large collection).
    pub fn count(&self, collection: &str, f: impl Fn(&Value) -> bool) -> usize {
        let Ok(target) = parse_path(collection) else {
            return 0;
        };
        self.with(|s| {
            s.objects
                .get(&target.collection)
                .into_iter()
                .flatten()
                .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|want| want == ns))
                .filter(|(_, o)| f(o))
                .count()
        })
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        let Ok(target) = parse_path(collection) else {
            return Vec::new();
        };
        self.with(|s| s.list(&target))["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Merge-patches an object (a `/status` path changes only its status).
    pub fn patch(&self, path: &str, patch: Value) -> Result<Value, ApiError> {
        let target = parse_path(path)?;
        self.with(|s| s.patch(&target, &patch))
    }

    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        let target = parse_path(path)?;
        self.with(|s| s.delete(&target))
    }

    /// Answers `verb` on `resource` (e.g. "update", "leases") with 403 Forbidden from now on,
    /// as an API server whose RBAC lacks the rule would; `allow_all` lifts every such ban.
    pub fn forbid(&self, verb: &'static str, resource: &str) {
        self.with(|s| s.forbidden.push((verb, resource.to_string())));
    }

    pub fn allow_all(&self) {
        self.with(|s| s.forbidden.clear());
    }

    /// Every request served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
    }
}

/// What RBAC sees of a request: verb, API group, resource (`services/status`), namespace, name.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Reads a line of [`FakeApi::requests`] as the authorizer would.
pub fn attributes(request: &str) -> Option<Attributes> {
    let (method, target) = request.split_once(' ')?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let t = parse_path(path).ok()?;
    let watching = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, t.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    let group = t
        .collection
        .0
        .strip_prefix("apis/")
        .and_then(|gv| gv.split('/').next())
        .unwrap_or("")
        .to_string();
    let resource = if t.status {
        format!("{}/status", t.collection.1)
    } else {
        t.collection.1.clone()
    };
    Some(Attributes {
        verb,
        group,
        resource,
        namespace: t.namespace,
        name: t.name,
    })
}

/// The rules of deploy/COMPONENT/rbac.yaml, each with the namespace it holds in (None: all).
pub fn shipped_rules(
    component: &str,
) -> Vec<(Option<String>, k8s_openapi::api::rbac::v1::PolicyRule)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../deploy/{component}/rbac.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        let scope = match v["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => Some(v["metadata"]["namespace"].as_str().unwrap().to_string()),
            _ => continue,
        };
        let rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule> =
            serde_json::from_value(v["rules"].clone()).unwrap();
        out.extend(rules.into_iter().map(|r| (scope.clone(), r)));
    }
    out
}

/// Would these rules allow the request, as the RBAC authorizer reads them?
pub fn allowed(
    rules: &[(Option<String>, k8s_openapi::api::rbac::v1::PolicyRule)],
    a: &Attributes,
) -> bool {
    let has =
        |list: &Option<Vec<String>>, v: &str| list.iter().flatten().any(|x| x == v || x == "*");
    rules.iter().any(|(scope, r)| {
        scope
            .as_ref()
            .is_none_or(|ns| a.namespace.as_ref() == Some(ns))
            && has(&r.api_groups, &a.group)
            && has(&r.resources, &a.resource)
            && r.verbs.iter().any(|v| v == a.verb || v == "*")
            && match &r.resource_names {
                Some(names) if !names.is_empty() => {
                    a.name.as_ref().is_some_and(|n| names.contains(n))
                }
                _ => true,
            }
    })
}

impl FakeApi {
    /// Panics unless deploy/COMPONENT/rbac.yaml allows every request served so far.
    pub fn assert_rbac_allows_every_request(&self, component: &str) {
        let rules = shipped_rules(component);
        let requests = self.requests();
        assert!(requests.len() > 10, "{requests:?}");
        for r in requests {
            let a = attributes(&r).unwrap_or_else(|| panic!("cannot read {r}"));
            assert!(
                allowed(&rules, &a),
                "deploy/{component}/rbac.yaml does not allow {r} ({a:?})"
            );
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        body,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        if code < 300 { "OK" } else { "Error" },
        text.len()
    )?;
    stream.flush()
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    // As Go's net/http (the real API server) does: no Nagle delay behind the client's
    // delayed ACK, which made every request over a kept-alive connection take 40 ms.
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut stream = stream;
    while let Some(request) = read_request(&mut reader) {
        FakeApi::wait_while_hanging(shared);
        if *shared.outage.lock().unwrap() == Outage::Refuse {
            return;
        }
        let query: Vec<String> = request
            .query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        shared.state.lock().unwrap().requests.push(format!(
            "{} {}?{}",
            request.method,
            request.path,
            query.join("&")
        ));
        let watching = request
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1");
        let line = format!("{} {}?{}", request.method, request.path, query.join("&"));
        let banned = attributes(&line).is_some_and(|a| {
            shared
                .state
                .lock()
                .unwrap()
                .forbidden
                .iter()
                .any(|(verb, resource)| *verb == a.verb && *resource == a.resource)
        });
        let result = if banned {
            Err(ApiError::new(
                403,
                "Forbidden",
                format!("{line} is forbidden: no RBAC rule allows it"),
            ))
        } else if watching && request.method == "GET" {
            match parse_path(&request.path) {
                Ok(target) => {
                    if stream_watch(&mut stream, shared, &target, &request).is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => Err(e),
            }
        } else {
            handle(shared, &request)
        };
        let sent = match result {
            Ok((code, body)) => respond(&mut stream, code, &body),
            Err(e) => respond(&mut stream, e.code, &e.body()),
        };
        if sent.is_err() {
            return;
        }
    }
}

fn handle(shared: &Shared, request: &Request) -> Result<(u16, Value), ApiError> {
    let target = parse_path(&request.path)?;
    let body = || -> Result<Value, ApiError> {
        // Apply patches may be YAML; JSON is YAML, and kube sends JSON.
        serde_json::from_slice(&request.body)
            .or_else(|_| yaml_serde::from_slice(&request.body))
            .map_err(|e| ApiError::new(400, "BadRequest", format!("the body does not parse: {e}")))
    };
    let mut state = shared.state.lock().unwrap();
    let out = match (request.method.as_str(), target.name.is_some()) {
        ("GET", false) => Ok((200, state.list(&target))),
        ("GET", true) => state.get(&target).map(|o| (200, o)),
        ("POST", false) => state.create(&target, body()?).map(|o| (201, o)),
        ("PUT", true) => state.replace(&target, body()?).map(|o| (200, o)),
        ("PATCH", true) => state.patch(&target, &body()?).map(|o| (200, o)),
        ("DELETE", true) => state.delete(&target).map(|o| (200, o)),
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", request.path),
        )),
    };
    shared.changed.notify_all();
    out
}

fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n", data.len())?;
    stream.write_all(data)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

/// Streams the events after the requested resourceVersion until the timeout.
fn stream_watch(
    stream: &mut TcpStream,
    shared: &Shared,
    target: &Target,
    request: &Request,
) -> std::io::Result<()> {
    let mut after: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let timeout: u64 = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(290);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    stream.flush()?;
    let mut state = shared.state.lock().unwrap();
    loop {
        if shared.stopping.load(Ordering::SeqCst) || Instant::now() >= deadline {
            break;
        }
        let outage = *shared.outage.lock().unwrap();
        match outage {
            Outage::None => {}
            Outage::Refuse => return Err(std::io::ErrorKind::ConnectionAborted.into()),
            Outage::Hang => {
                drop(state);
                FakeApi::wait_while_hanging(shared);
                state = shared.state.lock().unwrap();
                continue;
            }
        }
        // The log is in resourceVersion order: start past what was sent.
        let first = state.log.partition_point(|e| e.rv <= after);
        let due: Vec<WatchEvent> = state.log[first..]
            .iter()
            .filter(|e| {
                e.collection == target.collection
                    && target
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| *ns == e.namespace)
            })
            .cloned()
            .collect();
        after = after.max(state.rv);
        if due.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            state = shared
                .changed
                .wait_timeout(state, wait.min(Duration::from_millis(500)))
                .unwrap()
                .0;
            continue;
        }
        drop(state);
        for e in due {
            let line = format!("{}\n", json!({"type": e.type_, "object": e.object}));
            write_chunk(stream, line.as_bytes())?;
        }
        state = shared.state.lock().unwrap();
    }
    drop(state);
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_collection_namespace_name_and_subresource() {
        let t = parse_path("/api/v1/namespaces/default/services/web/status").unwrap();
        assert_eq!(t.collection, ("api/v1".into(), "services".into()));
        assert_eq!(t.namespace.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("web"));
        assert!(t.status);
        let all = parse_path("/api/v1/services").unwrap();
        assert_eq!(all.namespace, None);
        let ns = parse_path("/api/v1/namespaces/default").unwrap();
        assert_eq!(ns.collection.1, "namespaces");
        assert_eq!(ns.name.as_deref(), Some("default"));
        let crd = parse_path("/apis/sluice.dev/v1alpha1/namespaces/x/ipaddresspools").unwrap();
        assert_eq!(crd.collection.0, "apis/sluice.dev/v1alpha1");
        assert!(parse_path("/version").is_err());
    }

    #[test]
    fn an_outage_refuses_connections_then_hangs_them_then_serves_again() {
        let api = FakeApi::start();
        let get = |timeout: Duration| -> std::io::Result<String> {
            let mut c = TcpStream::connect_timeout(&api.address, timeout)?;
            c.set_read_timeout(Some(timeout))?;
            write!(c, "GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut buf = [0u8; 12];
            c.read_exact(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        assert_eq!(get(Duration::from_secs(2)).unwrap(), "HTTP/1.1 200");
        api.set_outage(Outage::Refuse);
        let refused = get(Duration::from_secs(2)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        api.set_outage(Outage::Hang);
        let hung = get(Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                hung.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{hung:?}"
        );
        api.set_outage(Outage::None);
        assert_eq!(get(Duration::from_secs(2)).unwrap(), "HTTP/1.1 200");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn status_writes_touch_only_status_and_stale_replaces_conflict() {
        let api = FakeApi::start();
        let svc = api
            .create(
                "/api/v1/namespaces/default/services",
                json!({"metadata": {"name": "web"}, "spec": {"type": "LoadBalancer"}}),
            )
            .unwrap();
        let path = "/api/v1/namespaces/default/services/web";
        api.patch(
            &format!("{path}/status"),
            json!({"spec": {"type": "ClusterIP"}, "status": {"x": 1}}),
        )
        .unwrap();
        let now = api.get(path).unwrap();
        assert_eq!(now["spec"]["type"], "LoadBalancer");
        assert_eq!(now["status"]["x"], 1);
        api.patch(path, json!({"status": {"x": 2}})).unwrap();
        assert_eq!(api.get(path).unwrap()["status"]["x"], 1);
        let mut stale = svc.clone();
        stale["spec"]["type"] = json!("NodePort");
        let target = parse_path(path).unwrap();
        let err = api.with(|s| s.replace(&target, stale)).unwrap_err();
        assert_eq!(err.code, 409);
    }
}
