// Package metrics holds wsp's Prometheus collectors, each registered on a
// registry of its own (no global state), with labels of low cardinality:
// entry points, client ids, status classes, causes; never URLs.
package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server is what a wsp server counts.
type Server struct {
	reg *prometheus.Registry

	requests          *prometheus.CounterVec
	inFlight          *prometheus.GaugeVec
	duration          *prometheus.HistogramVec
	bytes             *prometheus.CounterVec
	sessions          *prometheus.GaugeVec
	handshakeFailures *prometheus.CounterVec
	streamFailures    prometheus.Counter

	clusterForwarded    *prometheus.CounterVec
	clusterNodeFailures prometheus.Counter
	clusterReceived     *prometheus.CounterVec
}

// NewServer registers the server's collectors, plus the Go runtime's and
// the process's.
func NewServer() *Server {
	m := &Server{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_requests_total",
			Help: "App requests relayed, by entry point (request, proxy, connect), client id and status class (2xx..5xx).",
		}, []string{"entry", "client", "code"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "wsp_requests_in_flight",
			Help: "App requests being relayed, by entry point.",
		}, []string{"entry"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "wsp_request_duration_seconds",
			Help:    "Time from an app request's arrival to the end of its answer, by entry point.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"entry"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_bytes_total",
			Help: "Body bytes relayed, by direction: in (from apps) and out (to apps).",
		}, []string{"direction"}),
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "wsp_sessions",
			Help: "Client sessions connected, by client id.",
		}, []string{"client"}),
		handshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_handshake_failures_total",
			Help: "Client registrations refused, by cause (bad_request, unauthorized, forbidden, session_limit, draining, upgrade).",
		}, []string{"cause"}),
		streamFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wsp_stream_open_failures_total",
			Help: "Streams that could not be opened on a client session (the request went to another session when one was left).",
		}),
		clusterForwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_cluster_forwarded_total",
			Help: "App requests this node forwarded to another node holding their client, by result (ok: a node answered, whatever it answered; else the wsp error code of the failure on the hop: node_unreachable, tunnel_broken, body_too_large, draining, app_gone).",
		}, []string{"result"}),
		clusterNodeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wsp_cluster_node_failures_total",
			Help: "Attempts to reach another node that failed before any byte was sent (the next holder was tried, if any).",
		}),
		clusterReceived: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_cluster_received_total",
			Help: "Node-to-node requests received, by result (accepted; refused: missing or wrong cluster secret, missing or invalid node name, or this server is not a cluster node).",
		}, []string{"result"}),
	}
	m.reg.MustRegister(m.requests, m.inFlight, m.duration, m.bytes, m.sessions, m.handshakeFailures, m.streamFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Cluster registers the metrics of a node with a Redis directory: the
// forwarding counters, and gauges read from the directory when scraped.
func (m *Server) Cluster(up func() bool, held func() int, errors func() int64) {
	m.reg.MustRegister(m.clusterForwarded, m.clusterNodeFailures, m.clusterReceived,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "wsp_cluster_directory_up",
			Help: "1 when the last call to the Redis directory succeeded, else 0.",
		}, func() float64 {
			if up() {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "wsp_cluster_directory_client_ids",
			Help: "Client ids this node recorded in the directory at its last heartbeat.",
		}, func() float64 { return float64(held()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "wsp_cluster_directory_errors_total",
			Help: "Calls to the Redis directory that failed (heartbeats, lookups, withdraw).",
		}, func() float64 { return float64(errors()) }),
	)
}

// Forwarded counts an app request forwarded to another node.
func (m *Server) Forwarded(result string) { m.clusterForwarded.WithLabelValues(result).Inc() }

// NodeFailure counts an attempt at a node that could not be reached.
func (m *Server) NodeFailure() { m.clusterNodeFailures.Inc() }

// Received counts a node-to-node request.
func (m *Server) Received(result string) { m.clusterReceived.WithLabelValues(result).Inc() }

// Handler serves the metrics in the Prometheus text format.
func (m *Server) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Begin counts a request in flight; the returned func ends it with its
// outcome.
func (m *Server) Begin(entry string) (end func(client string, status int, in, out int64, d time.Duration)) {
	g := m.inFlight.WithLabelValues(entry)
	g.Inc()
	return func(client string, status int, in, out int64, d time.Duration) {
		g.Dec()
		m.requests.WithLabelValues(entry, client, StatusClass(status)).Inc()
		m.duration.WithLabelValues(entry).Observe(d.Seconds())
		m.bytes.WithLabelValues("in").Add(float64(in))
		m.bytes.WithLabelValues("out").Add(float64(out))
	}
}

// SessionUp and SessionDown track connected sessions of a client id.
func (m *Server) SessionUp(client string) { m.sessions.WithLabelValues(client).Inc() }

// SessionDown is SessionUp's counterpart; a client id without sessions
// leaves the metric.
func (m *Server) SessionDown(client string, left int) {
	if left == 0 {
		m.sessions.DeleteLabelValues(client)
		return
	}
	m.sessions.WithLabelValues(client).Dec()
}

// HandshakeFailure counts a refused registration.
func (m *Server) HandshakeFailure(cause string) { m.handshakeFailures.WithLabelValues(cause).Inc() }

// StreamOpenFailure counts a stream that could not be opened.
func (m *Server) StreamOpenFailure() { m.streamFailures.Inc() }

// StatusClass turns 404 into "4xx"; 0 (no answer: the app went away) is
// "none".
func StatusClass(status int) string {
	if status < 100 || status > 599 {
		return "none"
	}
	return strconv.Itoa(status/100) + "xx"
}

// Client is what a wsp client counts.
type Client struct {
	reg *prometheus.Registry

	requests   *prometheus.CounterVec
	inFlight   prometheus.Gauge
	sessions   prometheus.Gauge
	reconnects *prometheus.CounterVec
	duplicates prometheus.Counter
}

// NewClient registers the client's collectors, plus the Go runtime's and
// the process's.
func NewClient() *Client {
	m := &Client{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_client_requests_total",
			Help: "Requests executed for the server, by kind (http, connect, upgrade) and status class; refusals included.",
		}, []string{"kind", "code"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "wsp_client_requests_in_flight",
			Help: "Requests being executed.",
		}),
		sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "wsp_client_sessions",
			Help: "Sessions up: one per reachable target, or per server node with discovery or a node count.",
		}),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsp_client_reconnects_total",
			Help: "Session attempts after the first, by outcome (ok, failed).",
		}, []string{"outcome"}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wsp_client_duplicate_node_sessions_total",
			Help: "Sessions not kept because they landed on a server node another session of the target already held.",
		}),
	}
	m.reg.MustRegister(m.requests, m.inFlight, m.sessions, m.reconnects, m.duplicates,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Client) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Request counts one executed request.
func (m *Client) Request(kind string, status int) {
	m.requests.WithLabelValues(kind, StatusClass(status)).Inc()
}

// InFlight moves the in-flight gauge by delta.
func (m *Client) InFlight(delta float64) { m.inFlight.Add(delta) }

// Session moves the sessions gauge by delta.
func (m *Client) Session(delta float64) { m.sessions.Add(delta) }

// Reconnect counts a session attempt after the first.
func (m *Client) Reconnect(ok bool) {
	outcome := "failed"
	if ok {
		outcome = "ok"
	}
	m.reconnects.WithLabelValues(outcome).Inc()
}

// DuplicateNode counts a session closed because it landed on a node the
// target already held.
func (m *Client) DuplicateNode() { m.duplicates.Inc() }
