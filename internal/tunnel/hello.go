package tunnel

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"

	"wsp/internal/rules"
)

// Handshake headers. The client sends them on the upgrade request; the
// server checks them before it upgrades, so a refusal is a plain HTTP answer.
const (
	HeaderClientID   = "X-Wsp-Client-Id"
	HeaderSecretKey  = "X-Secret-Key" // as root-gg/wsp
	HeaderMaxStreams = "X-Wsp-Max-Streams"
	HeaderVersion    = "X-Wsp-Version"
	// HeaderRules carries the client's whitelist and blacklist, so the
	// server can pick a client that accepts a request without asking.
	HeaderRules = "X-Wsp-Rules"
	// HeaderSession is set by the server on its 101 answer.
	HeaderSession = "X-Wsp-Session"
	// HeaderNode names the server node on its 101 answer; HeaderNodes,
	// when set, is how many nodes a client should hold a session to.
	HeaderNode  = "X-Wsp-Node"
	HeaderNodes = "X-Wsp-Nodes"
)

// Limits on what a client may claim in its hello.
const (
	MaxStreamsLimit = 1 << 16
	maxVersionLen   = 64
	// MaxRulesLen bounds the encoded rules header; the server's header
	// limit (maxheaderbytes) bounds the whole request too.
	MaxRulesLen = 32 << 10
)

// ErrBadHello is wrapped by every ParseHello error.
var ErrBadHello = errors.New("bad handshake")

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidID reports whether id may name a client pool.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// Hello is what a client says about itself when it registers.
type Hello struct {
	ClientID   string
	SecretKey  string // shared secret, root-gg/wsp style
	Token      string // per-client credential, sent as Authorization: Bearer
	MaxStreams int    // concurrent streams the client serves on this session
	Version    string // the client's software version, for operators
	Rules      Rules  // what the client accepts to forward
}

// Rules is a client's whitelist and blacklist as its config states them.
type Rules struct {
	Whitelist []rules.Spec `json:"whitelist,omitempty"`
	Blacklist []rules.Spec `json:"blacklist,omitempty"`
}

// Header encodes h for the upgrade request.
func (h Hello) Header() http.Header {
	hdr := http.Header{}
	hdr.Set(HeaderClientID, h.ClientID)
	if h.SecretKey != "" {
		hdr.Set(HeaderSecretKey, h.SecretKey)
	}
	if h.Token != "" {
		hdr.Set("Authorization", "Bearer "+h.Token)
	}
	hdr.Set(HeaderMaxStreams, strconv.Itoa(h.MaxStreams))
	if h.Version != "" {
		hdr.Set(HeaderVersion, h.Version)
	}
	if len(h.Rules.Whitelist)+len(h.Rules.Blacklist) > 0 {
		b, _ := json.Marshal(h.Rules) // plain strings: cannot fail
		hdr.Set(HeaderRules, base64.RawURLEncoding.EncodeToString(b))
	}
	return hdr
}

// ParseHello decodes and checks a client's upgrade request headers.
func ParseHello(hdr http.Header) (Hello, error) {
	h := Hello{
		ClientID:  hdr.Get(HeaderClientID),
		SecretKey: hdr.Get(HeaderSecretKey),
		Version:   hdr.Get(HeaderVersion),
	}
	if scheme, token, ok := strings.Cut(hdr.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
		h.Token = strings.TrimSpace(token)
	}
	if !ValidID(h.ClientID) {
		return Hello{}, fmt.Errorf("%w: %s %q: want 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit", ErrBadHello, HeaderClientID, truncate(h.ClientID))
	}
	h.MaxStreams = MaxStreamsLimit
	if v := hdr.Get(HeaderMaxStreams); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxStreamsLimit {
			return Hello{}, fmt.Errorf("%w: %s %q: want 1..%d", ErrBadHello, HeaderMaxStreams, truncate(v), MaxStreamsLimit)
		}
		h.MaxStreams = n
	}
	if len(h.Version) > maxVersionLen || strings.ContainsFunc(h.Version, func(r rune) bool { return r < ' ' || r > '~' }) {
		return Hello{}, fmt.Errorf("%w: %s: want at most %d printable ASCII characters", ErrBadHello, HeaderVersion, maxVersionLen)
	}
	if v := hdr.Get(HeaderRules); v != "" {
		if len(v) > MaxRulesLen {
			return Hello{}, fmt.Errorf("%w: %s: longer than %d bytes", ErrBadHello, HeaderRules, MaxRulesLen)
		}
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil {
			return Hello{}, fmt.Errorf("%w: %s: %v", ErrBadHello, HeaderRules, err)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&h.Rules); err != nil {
			return Hello{}, fmt.Errorf("%w: %s: %v", ErrBadHello, HeaderRules, err)
		}
		if _, err := rules.NewSet(h.Rules.Whitelist, h.Rules.Blacklist); err != nil {
			return Hello{}, fmt.Errorf("%w: %s: %v", ErrBadHello, HeaderRules, err)
		}
	}
	return h, nil
}

// truncate keeps error messages about hostile input short.
func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
