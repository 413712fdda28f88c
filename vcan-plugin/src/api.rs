//! gRPC APIs spoken by vcan-plugin, generated at build time from `proto/`.
//!
//! - [`deviceplugin::v1beta1`]: the kubelet device-plugin API. The kubelet
//!   serves `Registration` on [`KUBELET_SOCKET`]; the plugin serves
//!   `DevicePlugin` on its own socket in [`DEVICE_PLUGIN_PATH`].
//! - [`podresources::v1`]: the kubelet pod-resources API, served on
//!   [`POD_RESOURCES_SOCKET`]; tells which pod got which device IDs.
//! - [`cri::v1`]: a subset of the Container Runtime Interface (`runtime.v1`),
//!   as served by containerd and CRI-O, for looking up pod sandboxes and for
//!   running pods from a kubelet stand-in in tests.
//! - [`containerd`]: containerd's events service and task events, which keep
//!   the plugin's index of pod sandboxes current between PreStarts, and its
//!   container records, which describe a sandbox whose task started.
//!
//! The `.proto` files are wire compatible with the upstream Kubernetes ones
//! (same packages, services, methods, messages, field numbers and types), so
//! the gRPC paths are the kubelet's and the runtimes' own, e.g.
//! `/v1beta1.Registration/Register` or `/runtime.v1.RuntimeService/ListPodSandbox`.
//! Each module holds the prost messages plus a `*_client` and a `*_server`
//! module per service (tonic).
//!
//! Upstream field names are kept, so a few Rust names are prost's
//! snake-casing of them:
//! - `ID` is `id` (device plugin `Device`, `NUMANode`);
//! - `available_deviceIDs`, `must_include_deviceIDs`, `deviceIDs` are
//!   `available_device_i_ds`, `must_include_device_i_ds`, `device_i_ds`;
//! - CRI `CDI_devices`, `uidMappings`, `gidMappings` are `cdi_devices`,
//!   `uid_mappings`, `gid_mappings`.

/// Kubelet device-plugin API, proto package `v1beta1`.
pub mod deviceplugin {
    /// Generated from `proto/deviceplugin/v1beta1/api.proto`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
}

/// Kubelet pod-resources API, proto package `v1`.
pub mod podresources {
    /// Generated from `proto/podresources/v1/api.proto`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod v1 {
        tonic::include_proto!("v1");
    }
}

/// Container Runtime Interface, proto package `runtime.v1` (subset).
pub mod cri {
    /// Generated from `proto/cri/v1/api.proto`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// containerd's own API, the events and containers services and task events (subset).
pub mod containerd {
    /// Generated from `proto/containerd/events/task.proto`.
    #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
    pub mod events {
        tonic::include_proto!("containerd.events");
    }

    /// containerd's services.
    pub mod services {
        /// The events service.
        pub mod events {
            /// Generated from `proto/containerd/services/events/v1/events.proto`.
            #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
            pub mod v1 {
                tonic::include_proto!("containerd.services.events.v1");
            }
        }

        /// The containers service (container records).
        pub mod containers {
            /// Generated from `proto/containerd/services/containers/v1/containers.proto`.
            #[allow(missing_docs, clippy::all, clippy::pedantic, clippy::nursery)]
            pub mod v1 {
                tonic::include_proto!("containerd.services.containers.v1");
            }
        }
    }
}

/// Device-plugin API version sent in `RegisterRequest::version`.
pub const DEVICE_PLUGIN_API_VERSION: &str = "v1beta1";

/// Directory where the kubelet's registration socket and the plugins' own
/// sockets live (the kubelet's default `DevicePluginPath`).
pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins";

/// File name of the kubelet's `Registration` socket inside
/// [`DEVICE_PLUGIN_PATH`].
pub const KUBELET_SOCKET_NAME: &str = "kubelet.sock";

/// Full path of the kubelet's `Registration` socket.
pub const KUBELET_SOCKET: &str = "/var/lib/kubelet/device-plugins/kubelet.sock";

/// Full path of the kubelet's pod-resources socket (`PodResourcesLister`).
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use prost::Message;
    use tonic::codegen::http;
    use tonic::server::NamedService;
    use tonic::{Request, Response, Status};

    use super::cri::v1 as cri;
    use super::deviceplugin::v1beta1 as dp;
    use super::podresources::v1 as pr;
    use super::*;

    /// Protobuf key byte(s) for a field: `(number << 3) | wire_type`, as varint.
    fn key(field: u32, wire_type: u32) -> Vec<u8> {
        let mut v = (field << 3) | wire_type;
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    const VARINT: u32 = 0;
    const LEN: u32 = 2;

    /// Length-delimited field: key, length, payload.
    fn len_field(field: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = key(field, LEN);
        out.push(u8::try_from(payload.len()).expect("short payload"));
        out.extend_from_slice(payload);
        out
    }

    fn varint_field(field: u32, value: u8) -> Vec<u8> {
        assert!(value < 0x80);
        let mut out = key(field, VARINT);
        out.push(value);
        out
    }

    #[test]
    fn constants_are_consistent() {
        assert_eq!(
            KUBELET_SOCKET,
            format!("{DEVICE_PLUGIN_PATH}/{KUBELET_SOCKET_NAME}")
        );
        assert_eq!(DEVICE_PLUGIN_API_VERSION, "v1beta1");
    }

    #[test]
    fn register_request_wire_format() {
        let req = dp::RegisterRequest {
            version: DEVICE_PLUGIN_API_VERSION.to_owned(),
            endpoint: "vcan.sock".to_owned(),
            resource_name: "example.com/vcan".to_owned(),
            options: Some(dp::DevicePluginOptions {
                pre_start_required: true,
                get_preferred_allocation_available: true,
            }),
        };
        let options = [varint_field(1, 1), varint_field(2, 1)].concat();
        let expected = [
            len_field(1, b"v1beta1"),
            len_field(2, b"vcan.sock"),
            len_field(3, b"example.com/vcan"),
            len_field(4, &options),
        ]
        .concat();
        assert_eq!(req.encode_to_vec(), expected);
        // Exact first bytes: tag 0x0a (field 1, LEN), length 7, "v1beta1".
        assert_eq!(&req.encode_to_vec()[..9], b"\x0a\x07v1beta1");
    }

    #[test]
    fn device_plugin_messages_wire_format() {
        let dev = dp::Device {
            id: "vcan0".to_owned(),
            health: "Healthy".to_owned(),
            topology: Some(dp::TopologyInfo {
                nodes: vec![dp::NumaNode { id: 1 }],
            }),
        };
        let topology = len_field(1, &varint_field(1, 1));
        let expected = [
            len_field(1, b"vcan0"),
            len_field(2, b"Healthy"),
            len_field(3, &topology),
        ]
        .concat();
        assert_eq!(dev.encode_to_vec(), expected);

        // What the kubelet sends to Allocate: container_requests(1) { devices_ids(1) }.
        let wire = len_field(1, &[len_field(1, b"a"), len_field(1, b"b")].concat());
        let req = dp::AllocateRequest::decode(wire.as_slice()).expect("decode");
        assert_eq!(req.container_requests.len(), 1);
        assert_eq!(req.container_requests[0].devices_ids, ["a", "b"]);

        // ContainerAllocateResponse: envs map(1), mounts(2), devices(3),
        // annotations map(4), cdi_devices(5).
        let resp = dp::ContainerAllocateResponse {
            devices: vec![dp::DeviceSpec {
                container_path: "/dev/x".to_owned(),
                host_path: "/dev/y".to_owned(),
                permissions: "rw".to_owned(),
            }],
            cdi_devices: vec![dp::CdiDevice {
                name: "v.com/c=d".to_owned(),
            }],
            ..Default::default()
        };
        let spec = [
            len_field(1, b"/dev/x"),
            len_field(2, b"/dev/y"),
            len_field(3, b"rw"),
        ]
        .concat();
        let expected = [
            len_field(3, &spec),
            len_field(5, &len_field(1, b"v.com/c=d")),
        ]
        .concat();
        assert_eq!(resp.encode_to_vec(), expected);

        let pref = dp::ContainerPreferredAllocationRequest {
            available_device_i_ds: vec!["a".to_owned()],
            must_include_device_i_ds: vec!["b".to_owned()],
            allocation_size: 1,
        };
        let expected = [len_field(1, b"a"), len_field(2, b"b"), varint_field(3, 1)].concat();
        assert_eq!(pref.encode_to_vec(), expected);
    }

    #[test]
    fn pod_resources_wire_format() {
        // GetPodResourcesResponse{pod_resources(1){name(1), namespace(2),
        // containers(3){name(1), devices(2){resource_name(1), device_ids(2)}}}}
        let devices = [len_field(1, b"r/vcan"), len_field(2, b"vcan0")].concat();
        let container = [len_field(1, b"c"), len_field(2, &devices)].concat();
        let pod = [
            len_field(1, b"p"),
            len_field(2, b"ns"),
            len_field(3, &container),
        ]
        .concat();
        let wire = len_field(1, &pod);
        let resp = pr::GetPodResourcesResponse::decode(wire.as_slice()).expect("decode");
        let pod = resp.pod_resources.expect("pod_resources");
        assert_eq!((pod.name.as_str(), pod.namespace.as_str()), ("p", "ns"));
        assert_eq!(pod.containers[0].name, "c");
        assert_eq!(pod.containers[0].devices[0].resource_name, "r/vcan");
        assert_eq!(pod.containers[0].devices[0].device_ids, ["vcan0"]);

        let req = pr::GetPodResourcesRequest {
            pod_name: "p".to_owned(),
            pod_namespace: "ns".to_owned(),
        };
        assert_eq!(
            req.encode_to_vec(),
            [len_field(1, b"p"), len_field(2, b"ns")].concat()
        );
    }

    #[test]
    fn cri_wire_format() {
        // High field numbers whose keys take two bytes.
        assert_eq!(key(17, LEN), [0x8a, 0x01]);
        let cfg = cri::ContainerConfig {
            cdi_devices: vec![cri::CdiDevice {
                name: "x".to_owned(),
            }],
            linux: Some(cri::LinuxContainerConfig {
                resources: None,
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: true,
                    run_as_group: Some(cri::Int64Value { value: 5 }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let sc = [varint_field(2, 1), len_field(12, &varint_field(1, 5))].concat();
        let expected = [
            len_field(15, &len_field(2, &sc)),
            len_field(17, &len_field(1, b"x")),
        ]
        .concat();
        assert_eq!(cfg.encode_to_vec(), expected);

        let image = cri::ImageSpec {
            image: "i".to_owned(),
            user_specified_image: "u".to_owned(),
            runtime_handler: "h".to_owned(),
            ..Default::default()
        };
        let expected = [len_field(1, b"i"), len_field(18, b"u"), len_field(19, b"h")].concat();
        assert_eq!(image.encode_to_vec(), expected);

        // Enum values.
        assert_eq!(cri::NamespaceMode::Node as i32, 2);
        assert_eq!(cri::NamespaceMode::Target as i32, 3);
        assert_eq!(cri::PodSandboxState::SandboxNotready as i32, 1);
        assert_eq!(cri::ContainerState::ContainerExited as i32, 2);

        // PodSandboxStatusResponse as a runtime sends it: status(1){id(1),
        // state(3)=NOTREADY, linux(6){namespaces(1){options(2){network(1)=NODE}}},
        // runtime_handler(9)}, info(2) map entry {key(1), value(2)}.
        let ns_options = varint_field(1, 2);
        let linux = len_field(1, &len_field(2, &ns_options));
        let status = [
            len_field(1, b"sb"),
            varint_field(3, 1),
            len_field(6, &linux),
            len_field(9, b"runc"),
        ]
        .concat();
        let info = [len_field(1, b"info"), len_field(2, b"{}")].concat();
        let wire = [len_field(1, &status), len_field(2, &info)].concat();
        let resp = cri::PodSandboxStatusResponse::decode(wire.as_slice()).expect("decode");
        let st = resp.status.expect("status");
        assert_eq!(st.id, "sb");
        assert_eq!(st.state(), cri::PodSandboxState::SandboxNotready);
        assert_eq!(st.runtime_handler, "runc");
        let net = st
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .expect("namespace options")
            .network();
        assert_eq!(net, cri::NamespaceMode::Node);
        assert_eq!(resp.info.get("info").map(String::as_str), Some("{}"));

        // PodSandboxFilter{state(2){state(1)}, label_selector(3)}.
        let filter = cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
            label_selector: [("k".to_owned(), "v".to_owned())].into(),
            ..Default::default()
        };
        let entry = [len_field(1, b"k"), len_field(2, b"v")].concat();
        assert_eq!(
            filter.encode_to_vec(),
            [len_field(2, &[]), len_field(3, &entry)].concat()
        );
    }

    #[test]
    fn service_names() {
        assert_eq!(
            <dp::registration_server::RegistrationServer<Kubelet> as NamedService>::NAME,
            "v1beta1.Registration"
        );
        assert_eq!(
            <dp::device_plugin_server::DevicePluginServer<Plugin> as NamedService>::NAME,
            "v1beta1.DevicePlugin"
        );
        assert_eq!(
            pr::pod_resources_lister_server::SERVICE_NAME,
            "v1.PodResourcesLister"
        );
        assert_eq!(
            cri::runtime_service_server::SERVICE_NAME,
            "runtime.v1.RuntimeService"
        );
        assert_eq!(
            cri::image_service_server::SERVICE_NAME,
            "runtime.v1.ImageService"
        );
    }

    /// Records the request paths that a generated client sends.
    type Paths = Arc<Mutex<Vec<String>>>;

    /// Wraps a generated server so that the client talks to it in-process,
    /// through real gRPC framing, while the request paths are recorded.
    fn recording<S>(
        server: S,
        paths: Paths,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = S::Future,
    > + Clone
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone,
    {
        tower::ServiceExt::map_request(server, move |req: http::Request<tonic::body::Body>| {
            paths
                .lock()
                .expect("paths lock")
                .push(req.uri().path().to_owned());
            req
        })
    }

    #[derive(Default)]
    struct Kubelet {
        got: Mutex<Option<dp::RegisterRequest>>,
    }

    #[tonic::async_trait]
    impl dp::registration_server::Registration for Arc<Kubelet> {
        async fn register(
            &self,
            request: Request<dp::RegisterRequest>,
        ) -> Result<Response<dp::Empty>, Status> {
            *self.got.lock().expect("lock") = Some(request.into_inner());
            Ok(Response::new(dp::Empty {}))
        }
    }

    struct Plugin;

    #[tonic::async_trait]
    impl dp::device_plugin_server::DevicePlugin for Plugin {
        async fn get_device_plugin_options(
            &self,
            _: Request<dp::Empty>,
        ) -> Result<Response<dp::DevicePluginOptions>, Status> {
            Ok(Response::new(dp::DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true,
            }))
        }

        type ListAndWatchStream =
            futures::stream::BoxStream<'static, Result<dp::ListAndWatchResponse, Status>>;

        async fn list_and_watch(
            &self,
            _: Request<dp::Empty>,
        ) -> Result<Response<Self::ListAndWatchStream>, Status> {
            let item = dp::ListAndWatchResponse {
                devices: vec![dp::Device {
                    id: "vcan0".to_owned(),
                    health: "Healthy".to_owned(),
                    topology: None,
                }],
            };
            let stream = futures::stream::iter([Ok(item)]);
            Ok(Response::new(Box::pin(stream)))
        }

        async fn get_preferred_allocation(
            &self,
            _: Request<dp::PreferredAllocationRequest>,
        ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
            Err(Status::unimplemented("test"))
        }

        async fn allocate(
            &self,
            request: Request<dp::AllocateRequest>,
        ) -> Result<Response<dp::AllocateResponse>, Status> {
            let container_responses = request
                .into_inner()
                .container_requests
                .into_iter()
                .map(|c| dp::ContainerAllocateResponse {
                    envs: [("VCAN".to_owned(), c.devices_ids.join(","))].into(),
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(dp::AllocateResponse {
                container_responses,
            }))
        }

        async fn pre_start_container(
            &self,
            _: Request<dp::PreStartContainerRequest>,
        ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
            Ok(Response::new(dp::PreStartContainerResponse {}))
        }
    }

    #[tokio::test]
    async fn device_plugin_round_trip_paths() {
        use futures::StreamExt;

        let paths = Paths::default();

        let kubelet = Arc::new(Kubelet::default());
        let server = dp::registration_server::RegistrationServer::new(Arc::clone(&kubelet));
        let mut client =
            dp::registration_client::RegistrationClient::new(recording(server, paths.clone()));
        client
            .register(dp::RegisterRequest {
                version: DEVICE_PLUGIN_API_VERSION.to_owned(),
                endpoint: "vcan.sock".to_owned(),
                resource_name: "example.com/vcan".to_owned(),
                options: None,
            })
            .await
            .expect("register");
        let got = kubelet.got.lock().expect("lock").clone().expect("request");
        assert_eq!(got.endpoint, "vcan.sock");

        let server = dp::device_plugin_server::DevicePluginServer::new(Plugin);
        let mut client =
            dp::device_plugin_client::DevicePluginClient::new(recording(server, paths.clone()));
        let opts = client
            .get_device_plugin_options(dp::Empty {})
            .await
            .expect("options")
            .into_inner();
        assert!(opts.get_preferred_allocation_available);
        let mut stream = client
            .list_and_watch(dp::Empty {})
            .await
            .expect("list_and_watch")
            .into_inner();
        let first = stream.next().await.expect("item").expect("ok");
        assert_eq!(first.devices[0].id, "vcan0");
        assert!(stream.next().await.is_none());
        let err = client
            .get_preferred_allocation(dp::PreferredAllocationRequest::default())
            .await
            .expect_err("unimplemented");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        let alloc = client
            .allocate(dp::AllocateRequest {
                container_requests: vec![dp::ContainerAllocateRequest {
                    devices_ids: vec!["a".to_owned(), "b".to_owned()],
                }],
            })
            .await
            .expect("allocate")
            .into_inner();
        assert_eq!(alloc.container_responses[0].envs["VCAN"], "a,b");
        client
            .pre_start_container(dp::PreStartContainerRequest::default())
            .await
            .expect("pre_start");

        assert_eq!(
            *paths.lock().expect("lock"),
            [
                "/v1beta1.Registration/Register",
                "/v1beta1.DevicePlugin/GetDevicePluginOptions",
                "/v1beta1.DevicePlugin/ListAndWatch",
                "/v1beta1.DevicePlugin/GetPreferredAllocation",
                "/v1beta1.DevicePlugin/Allocate",
                "/v1beta1.DevicePlugin/PreStartContainer",
            ]
        );
    }

    /// A transport that records the path and answers every call with
    /// `UNIMPLEMENTED`, for checking client paths without a server.
    fn unimplemented_transport(
        paths: Paths,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            paths
                .lock()
                .expect("paths lock")
                .push(req.uri().path().to_owned());
            let resp = Status::unimplemented("recorded").into_http();
            async move { Ok(resp) }
        })
    }

    #[tokio::test]
    async fn pod_resources_and_cri_client_paths() {
        let paths = Paths::default();

        let mut pr_client = pr::pod_resources_lister_client::PodResourcesListerClient::new(
            unimplemented_transport(paths.clone()),
        );
        assert!(
            pr_client
                .list(pr::ListPodResourcesRequest {})
                .await
                .is_err()
        );
        assert!(
            pr_client
                .get_allocatable_resources(pr::AllocatableResourcesRequest {})
                .await
                .is_err()
        );
        assert!(
            pr_client
                .get(pr::GetPodResourcesRequest::default())
                .await
                .is_err()
        );

        let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(
            unimplemented_transport(paths.clone()),
        );
        assert!(rt.version(cri::VersionRequest::default()).await.is_err());
        assert!(
            rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
                .is_err()
        );
        assert!(
            rt.pod_sandbox_status(cri::PodSandboxStatusRequest::default())
                .await
                .is_err()
        );
        assert!(
            rt.run_pod_sandbox(cri::RunPodSandboxRequest::default())
                .await
                .is_err()
        );
        assert!(
            rt.create_container(cri::CreateContainerRequest::default())
                .await
                .is_err()
        );
        assert!(rt.exec_sync(cri::ExecSyncRequest::default()).await.is_err());

        let mut img = cri::image_service_client::ImageServiceClient::new(unimplemented_transport(
            paths.clone(),
        ));
        assert!(
            img.list_images(cri::ListImagesRequest::default())
                .await
                .is_err()
        );
        assert!(
            img.image_status(cri::ImageStatusRequest::default())
                .await
                .is_err()
        );

        assert_eq!(
            *paths.lock().expect("lock"),
            [
                "/v1.PodResourcesLister/List",
                "/v1.PodResourcesLister/GetAllocatableResources",
                "/v1.PodResourcesLister/Get",
                "/runtime.v1.RuntimeService/Version",
                "/runtime.v1.RuntimeService/ListPodSandbox",
                "/runtime.v1.RuntimeService/PodSandboxStatus",
                "/runtime.v1.RuntimeService/RunPodSandbox",
                "/runtime.v1.RuntimeService/CreateContainer",
                "/runtime.v1.RuntimeService/ExecSync",
                "/runtime.v1.ImageService/ListImages",
                "/runtime.v1.ImageService/ImageStatus",
            ]
        );
    }
}
