package tunnel

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

// Handshake headers. The client sends them on the upgrade request; the
// server checks them before it upgrades, so a refusal is a plain HTTP answer.
const (
	HeaderClientID   = "X-Wsp-Client-Id"
	HeaderSecretKey  = "X-Secret-Key" // as root-gg/wsp
	HeaderMaxStreams = "X-Wsp-Max-Streams"
	HeaderVersion    = "X-Wsp-Version"
	// HeaderSession is set by the server on its 101 answer.
	HeaderSession = "X-Wsp-Session"
)

// Limits on what a client may claim in its hello.
const (
	MaxStreamsLimit = 1 << 16
	maxVersionLen   = 64
)

// ErrBadHello is wrapped by every ParseHello error.
var ErrBadHello = errors.New("bad handshake")

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidID reports whether id may name a client pool.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// Hello is what a client says about itself when it registers.
type Hello struct {
	ClientID   string
	SecretKey  string
	MaxStreams int    // concurrent streams the client serves on this session
	Version    string // the client's software version, for operators
}

// Header encodes h for the upgrade request.
func (h Hello) Header() http.Header {
	hdr := http.Header{}
	hdr.Set(HeaderClientID, h.ClientID)
	if h.SecretKey != "" {
		hdr.Set(HeaderSecretKey, h.SecretKey)
	}
	hdr.Set(HeaderMaxStreams, strconv.Itoa(h.MaxStreams))
	if h.Version != "" {
		hdr.Set(HeaderVersion, h.Version)
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
	return h, nil
}

// truncate keeps error messages about hostile input short.
func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
