package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"wsp/internal/cluster"
	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// A node-to-node request carries these two headers: the name of the node
// that forwards it and the cluster secret. A node that receives one with
// the right secret serves it from its own sessions only, never forwards it
// again (no loops), and trusts the app authentication the first node did.
// See docs/protocol.md, "Between server nodes".
const (
	headerClusterNode   = "X-Wsp-Cluster-Node"
	headerClusterSecret = "X-Wsp-Cluster-Secret"
)

// forwardedHeaders are set by the node an app reached, as the destination
// must see them; a node serving a forwarded request keeps them.
var forwardedHeaders = []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

const (
	// nodeDialTimeout bounds connecting to another node: an unreachable
	// holder costs a request at most this before the next one is tried.
	nodeDialTimeout = 2 * time.Second
	// withdrawTimeout bounds removing this node from the directory at the
	// start of a drain.
	withdrawTimeout = 3 * time.Second
)

// clusterNode is what a server with a Redis directory adds: the directory,
// and the HTTP client and reverse proxy that forward requests to the nodes
// holding their client.
type clusterNode struct {
	dir       *cluster.Directory
	secret    string
	transport *http.Transport // node-to-node HTTP/1.1 connections
	dialer    *net.Dialer
	tls       *tls.Config // for https:// advertised URLs
	proxy     *httputil.ReverseProxy
	forwarded atomic.Int64 // app requests forwarded to another node
	received  atomic.Int64 // node requests accepted from other nodes
}

// forwarding is the state of a request this node forwards.
type forwarding struct {
	nodes []cluster.Node // to try, in order
	// result: "ok" when a node answered (whatever it answered), else the
	// code of the failure on the hop; for wsp_cluster_forwarded_total.
	result string
}

// newCluster sets up the directory and the node-to-node client; nothing
// touches the network before Serve.
func (s *Server) newCluster() (*clusterNode, error) {
	cc := s.cfg.Cluster
	dir, err := cluster.New(cluster.Config{
		Redis:     cc.Redis,
		Node:      s.node,
		Advertise: strings.TrimSuffix(cc.Advertise, "/"),
		TTL:       cc.TTL.D(),
		Held:      s.reg.clientIDs,
		Log:       s.log,
	})
	if err != nil {
		return nil, err
	}
	ka := s.cfg.KeepAlive.D()
	c := &clusterNode{
		dir:    dir,
		secret: cc.Secret,
		// A node that dies without a FIN is noticed within three keepalive
		// intervals, not the system's two hours.
		dialer: &net.Dialer{Timeout: nodeDialTimeout, KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: ka, Interval: ka, Count: 2}},
		tls:    &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}},
	}
	if s.certs != nil {
		// Nodes that require client certificates (tls.clientca) accept
		// each other's when they share a certificate signed by that CA.
		c.tls.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.certs.current(), nil
		}
	}
	c.transport = &http.Transport{
		DialContext:         c.dialer.DialContext,
		TLSClientConfig:     c.tls,
		TLSHandshakeTimeout: nodeDialTimeout,
		// HTTP/1.1 only: upgrades and streaming bodies pass as they do
		// from apps. Idle connections are dropped before the other node's
		// http.Server would (2 minutes), so a reused one is rarely stale.
		TLSNextProto:           map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 1 << 20,
		WriteBufferSize:        32 << 10,
		ReadBufferSize:         32 << 10,
	}
	c.proxy = s.newNodeProxy(c)
	s.metrics.Cluster(dir.Up, func() int { return dir.Status().Held }, dir.Errors)
	return c, nil
}

// current returns the certificate the server presents now.
func (c *certStore) current() *tls.Certificate {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.cert
}

// startCluster begins the directory's heartbeats.
func (s *Server) startCluster() {
	if s.cluster != nil {
		s.cluster.dir.Start()
		s.log.Info("cluster node", "node", s.node, "advertise", s.cfg.Cluster.Advertise, "redis", s.cluster.dir.Status().Redis, "ttl", s.cfg.Cluster.TTL.D())
	}
}

// withdraw removes this node from the directory, first thing in a drain:
// other nodes stop forwarding to it at once rather than after the TTL.
func (s *Server) withdraw() {
	if s.cluster == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), withdrawTimeout)
	defer cancel()
	if err := s.cluster.dir.Withdraw(ctx); err != nil {
		s.log.Warn("drain: could not remove this node from the cluster directory; its entries expire within the ttl", "ttl", s.cfg.Cluster.TTL.D(), "cause", err)
		return
	}
	s.log.Info("drain: removed this node from the cluster directory", "node", s.node)
}

// closeCluster stops the heartbeats and closes the connections to Redis
// and to other nodes.
func (s *Server) closeCluster() {
	if s.cluster != nil {
		s.cluster.dir.Close()
		s.cluster.transport.CloseIdleConnections()
	}
}

// clusterChanged tells the directory that the held client ids changed.
func (s *Server) clusterChanged() {
	if s.cluster != nil {
		s.cluster.dir.Changed()
	}
}

type viaKey struct{}

// viaOf returns the node that forwarded the request of ctx, "" for an app's.
func viaOf(ctx context.Context) string {
	v, _ := ctx.Value(viaKey{}).(string)
	return v
}

// fromNode checks the cluster headers of r, if any, and removes them: it
// returns the name of the node that forwarded r ("" when r came from an
// app) or the refusal to answer. The secret is compared in constant time
// and never logged.
func (s *Server) fromNode(r *http.Request) (string, *httperr.Error) {
	name, secret := r.Header.Get(headerClusterNode), r.Header.Get(headerClusterSecret)
	if name == "" && secret == "" {
		return "", nil
	}
	r.Header.Del(headerClusterNode)
	r.Header.Del(headerClusterSecret)
	var e *httperr.Error
	switch {
	case s.cluster == nil:
		e = httperr.New(http.StatusForbidden, httperr.Forbidden, "a node-to-node request (%s), but this server is not a cluster node: cluster.redis is not set", headerClusterNode)
	case name == "":
		e = httperr.New(http.StatusBadRequest, httperr.BadRequest, "a node-to-node request without %s naming the node that sent it", headerClusterNode)
	case secret == "":
		e = httperr.New(http.StatusUnauthorized, httperr.Unauthorized, "node-to-node request from node %q without %s", name, headerClusterSecret)
	case !equal(secret, s.cluster.secret):
		e = httperr.New(http.StatusForbidden, httperr.Forbidden, "node-to-node request from node %q: wrong cluster secret (cluster.secret differs between the nodes?)", name)
	case !tunnel.ValidID(name):
		e = httperr.New(http.StatusBadRequest, httperr.BadRequest, "%s %q is not a valid node name", headerClusterNode, name)
	}
	if e != nil {
		s.metrics.Received("refused")
		s.log.Warn("node request refused", "remote", r.RemoteAddr, "status", e.Status, "cause", e.Msg)
		return "", e
	}
	s.metrics.Received("accepted")
	s.cluster.received.Add(1)
	return name, nil
}

// forwarded serves x through another node when this one is a cluster node,
// the request came from an app (a node's request is never forwarded
// again), no session here can serve it, and the directory names nodes that
// may. It reports whether it answered the app. Otherwise the request is
// served here as without a cluster, and its 503 says where wsp looked.
func (s *Server) forwarded(rec *recorder, r *http.Request, x *exchange) bool {
	c := s.cluster
	if c == nil || x.via != "" || s.reg.holds(x.want) {
		return false
	}
	var nodes []cluster.Node
	if id := x.want.clientID; id != "" {
		var err error
		if nodes, err = c.dir.Holders(r.Context(), id); err != nil {
			x.want.scope = " to this node, and the cluster directory could not be asked about the others"
			return false
		}
	} else {
		// Requests that name no client go to a node holding some client,
		// as known at the last heartbeat; its clients' rules decide.
		nodes = c.dir.NodesWithClients()
	}
	if len(nodes) == 0 {
		x.want.scope = " to any node"
		return false
	}
	// Spread the load over the holders; the next is tried when one is
	// unreachable.
	rand.Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
	x.fwd = &forwarding{nodes: nodes, result: "ok"}
	x.clientID = x.want.clientID
	c.forwarded.Add(1)
	if r.Method == http.MethodConnect {
		s.forwardConnect(rec, r, x)
	} else {
		c.proxy.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x)))
	}
	s.metrics.Forwarded(x.fwd.result)
	return true
}

// newNodeProxy is the reverse proxy that forwards app requests to another
// node: as a /request with the destination and the client in X-Proxy-*
// headers, the app's X-Forwarded-* and X-Request-Id as this node set them,
// the cluster headers and a Via naming this node. Bodies stream both ways.
func (s *Server) newNodeProxy(c *clusterNode) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			x := exchangeOf(pr.In.Context())
			pr.SetXForwarded()
			for name := range pr.Out.Header {
				if strings.HasPrefix(name, proxyHeaderPrefix) {
					delete(pr.Out.Header, name)
				}
			}
			h := pr.Out.Header
			h.Set(headerDestination, x.dest.String())
			if x.want.clientID != "" {
				h.Set(headerClient, x.want.clientID)
			}
			h.Set(headerClusterNode, s.node)
			h.Set(headerClusterSecret, c.secret)
			h.Add("Via", "1.1 "+s.node)
			pr.Out.URL = &url.URL{Path: "/request"} // nodeTransport adds each node's scheme and host
			pr.Out.Host = ""
		},
		Transport:     &nodeTransport{s: s, base: c.transport},
		FlushInterval: -1, // event streams and long polls pass as they come
		ModifyResponse: func(resp *http.Response) error {
			x := exchangeOf(resp.Request.Context())
			if x.bodyTooLarge.Load() {
				// The node saw a truncated body; its answer is moot.
				return errBodyTooLarge
			}
			resp.Header.Del(headerRequestID) // set already, the same
			resp.Header.Add("Via", "1.1 "+x.node)
			if code := resp.Header.Get(httperr.Header); code != "" && resp.StatusCode >= 400 {
				x.err = clientError(resp, code)
			}
			return nil
		},
		ErrorLog:   s.proxy.ErrorLog,
		BufferPool: copyBuffers,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			x := exchangeOf(r.Context())
			switch {
			case x.bodyTooLarge.Load():
				x.err = httperr.New(http.StatusRequestEntityTooLarge, httperr.BodyTooLarge, "request body exceeds the limit of %d bytes (maxbodybytes)", x.bodyLimit)
			case r.Context().Err() != nil:
				x.err = httperr.Wrap(err, 499, "app_gone", "the app went away")
				x.fwd.result = x.err.Code
				return
			default:
				x.err = httperr.From(err)
			}
			x.fwd.result = x.err.Code
			httperr.Write(w, x.err)
		},
	}
}

// nodeTransport sends a forwarded request to the nodes of its exchange in
// turn: the next is tried when one cannot be reached (nothing was sent),
// or, for a request without a body, when one answers that it no longer
// holds the client.
type nodeTransport struct {
	s    *Server
	base *http.Transport
}

func (t *nodeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	x := exchangeOf(req.Context())
	hasBody := req.Body != nil && req.Body != http.NoBody
	nodes := x.fwd.nodes
	var failures []string
	for i, n := range nodes {
		u, err := nodeURL(n)
		if err != nil {
			failures = append(failures, err.Error())
			continue
		}
		out := req.Clone(req.Context())
		out.URL.Scheme, out.URL.Host, out.Host = u.Scheme, u.Host, u.Host
		if hasBody {
			// A failed attempt must not close the app's body, which the
			// next attempt sends; http.Server closes it in the end.
			out.Body = noClose{req.Body}
		}
		x.node = n.Name
		resp, err := t.base.RoundTrip(out)
		if err != nil {
			if cerr := req.Context().Err(); cerr != nil {
				return nil, cerr
			}
			if !notConnected(err) {
				return nil, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the exchange with node %q broke", n.Name)
			}
			t.s.metrics.NodeFailure()
			failures = append(failures, fmt.Sprintf("%s: %v", n.Name, err))
			continue
		}
		if i < len(nodes)-1 && !hasBody && notHeld(resp, x) {
			// The directory was behind: that node lost the client since
			// (or, for any client, its clients refuse); the next may not.
			resp.Body.Close()
			failures = append(failures, fmt.Sprintf("%s: answered %d %s", n.Name, resp.StatusCode, resp.Header.Get(httperr.Header)))
			continue
		}
		return resp, nil
	}
	x.node = ""
	return nil, unreachable(x, failures)
}

// noClose is a request body a failed attempt may not close.
type noClose struct{ io.Reader }

func (noClose) Close() error { return nil }

// nodeURL parses a node's advertised URL as the directory holds it.
func nodeURL(n cluster.Node) (*url.URL, error) {
	u, err := url.Parse(n.URL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("%s: advertised URL %q is not http(s)://host:port", n.Name, n.URL)
	}
	return u, nil
}

// notConnected reports whether err happened before a connection to the
// node existed, so that no byte of the request can have reached it.
func notConnected(err error) bool {
	var op *net.OpError
	var cert *tls.CertificateVerificationError
	return (errors.As(err, &op) && op.Op == "dial") || errors.As(err, &cert)
}

// notHeld reports whether a node's answer says it cannot serve the request
// though the directory said it might: it holds no such client (any more),
// or, for a request naming no client, its clients refuse it.
func notHeld(resp *http.Response, x *exchange) bool {
	code := resp.Header.Get(httperr.Header)
	return (resp.StatusCode == http.StatusServiceUnavailable && code == httperr.NoClient) ||
		(x.want.clientID == "" && resp.StatusCode == http.StatusForbidden && code == httperr.ClientRefused)
}

// unreachable is the answer when no node the directory named could serve.
func unreachable(x *exchange, failures []string) *httperr.Error {
	who := "clients are held by"
	if id := x.want.clientID; id != "" {
		who = "client " + strconv.Quote(id) + " is held by"
	}
	return httperr.New(http.StatusBadGateway, httperr.NodeUnreachable, "%s %d other node(s) per the cluster directory, but none could serve the request: %s",
		who, len(x.fwd.nodes), strings.Join(failures, "; "))
}

// forwardConnect opens x's CONNECT tunnel through a node holding its
// client: a CONNECT to that node with the cluster headers, then the app's
// connection and the node's are joined.
func (s *Server) forwardConnect(rec *recorder, r *http.Request, x *exchange) {
	fail := func(e *httperr.Error) {
		x.err = e
		x.fwd.result = e.Code
		httperr.Write(rec, e)
	}
	nodes := x.fwd.nodes
	var failures []string
	for i, n := range nodes {
		x.node = n.Name
		conn, err := s.dialNode(r.Context(), n)
		if err != nil {
			if r.Context().Err() != nil {
				x.err = httperr.Wrap(err, 499, "app_gone", "the app went away")
				x.fwd.result = x.err.Code
				return
			}
			s.metrics.NodeFailure()
			failures = append(failures, err.Error())
			continue
		}
		br, resp, err := s.askConnect(r.Context(), conn, x, r)
		if err != nil {
			conn.Close()
			fail(httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "CONNECT through node %q failed", n.Name))
			return
		}
		if resp.StatusCode != http.StatusOK {
			if i < len(nodes)-1 && notHeld(resp, x) {
				resp.Body.Close()
				conn.Close()
				failures = append(failures, fmt.Sprintf("%s: answered %d %s", n.Name, resp.StatusCode, resp.Header.Get(httperr.Header)))
				continue
			}
			if code := resp.Header.Get(httperr.Header); code != "" {
				x.err = clientError(resp, code)
			}
			resp.Header.Add("Via", "1.1 "+n.Name)
			relayAnswer(rec, resp)
			conn.Close()
			return
		}
		s.splice(rec, x, tunnel.End{Conn: conn, Reader: br})
		conn.Close() // when splice could not take over the app's connection
		return
	}
	x.node = ""
	fail(unreachable(x, failures))
}

// dialNode connects to a node's advertised address, with TLS for https.
func (s *Server) dialNode(ctx context.Context, n cluster.Node) (net.Conn, error) {
	u, err := nodeURL(n)
	if err != nil {
		return nil, err
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
	}
	c := s.cluster
	conn, err := c.dialer.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.Name, err)
	}
	if u.Scheme == "https" {
		cfg := c.tls.Clone()
		cfg.ServerName = u.Hostname()
		tc := tls.Client(conn, cfg)
		hctx, cancel := context.WithTimeout(ctx, nodeDialTimeout)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("%s: TLS handshake: %w", n.Name, err)
		}
		conn = tc
	}
	return conn, nil
}

// askConnect sends x's CONNECT to a node on conn and reads its answer; the
// reader holds what the node sent after the answer's head.
func (s *Server) askConnect(ctx context.Context, conn net.Conn, x *exchange, r *http.Request) (*bufio.Reader, *http.Response, error) {
	target := x.dest.Host
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: http.Header{}}
	h := req.Header
	h.Set(headerClusterNode, s.node)
	h.Set(headerClusterSecret, s.cluster.secret)
	h.Set(headerRequestID, x.id)
	if x.want.clientID != "" {
		h.Set(headerClient, x.want.clientID)
	}
	h["Via"] = append(r.Header.Values("Via"), "1.1 "+s.node)
	// The node answers once its client has dialled; the app going away
	// ends the wait.
	conn.SetDeadline(time.Now().Add(connectAnswerTimeout))
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	bw := bufio.NewWriterSize(conn, 1024)
	err := req.Write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return nil, nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, nil, err
	}
	if !stop() {
		resp.Body.Close()
		return nil, nil, ctx.Err()
	}
	conn.SetDeadline(time.Time{})
	return br, resp, nil
}

// ClusterStats is the directory as this node sees it, and its forwarding
// counters, for /api/stats.
type ClusterStats struct {
	cluster.Status
	Forwarded int64 `json:"forwarded_total"` // app requests forwarded to other nodes
	Received  int64 `json:"received_total"`  // node requests accepted from other nodes
}

func (s *Server) clusterStats() *ClusterStats {
	if s.cluster == nil {
		return nil
	}
	return &ClusterStats{Status: s.cluster.dir.Status(), Forwarded: s.cluster.forwarded.Load(), Received: s.cluster.received.Load()}
}
