// Package legacy is root-gg/wsp's wire protocol, which wsp speaks for old
// clients (an upgrade without the wsp.v2 subprotocol) and, as a client, to
// old servers. One WebSocket carries one request at a time:
//
//	client → server  text   "<id>_<poolidlesize>"  (once, on connect)
//	server → client  text   JSON RequestHead
//	server → client  binary the whole request body (empty if none)
//	client → server  text   JSON ResponseHead
//	client → server  binary the whole response body (empty if none)
//
// Bodies are whole messages, so both sides bound them (MaxMessage) instead
// of trusting the peer, and any message out of order ends the connection.
package legacy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// StatusClientError is what an old client answers when it refuses a
// request or cannot execute it, with the reason as the body.
const StatusClientError = 527

// ErrProtocol is wrapped by every violation of the protocol.
var ErrProtocol = errors.New("legacy protocol violation")

// RequestHead is the JSON an old server sends before a request's body.
// Field names are as root-gg/wsp writes them.
type RequestHead struct {
	Method        string
	URL           string // the absolute destination URL
	Header        http.Header
	ContentLength int64 // -1 when unknown
}

// ResponseHead is the JSON an old client sends before an answer's body.
type ResponseHead struct {
	StatusCode    int
	Header        http.Header
	ContentLength int64
}

// ParseGreeting reads a client's first message, "<id>_<poolidlesize>".
func ParseGreeting(msg string) (id string, idle int, err error) {
	parts := strings.Split(msg, "_")
	if len(parts) != 2 || parts[0] == "" {
		return "", 0, fmt.Errorf("%w: greeting %q: want <id>_<poolidlesize>", ErrProtocol, truncate(msg))
	}
	idle, err = strconv.Atoi(parts[1])
	if err != nil || idle < 0 {
		return "", 0, fmt.Errorf("%w: greeting %q: pool size is not a number", ErrProtocol, truncate(msg))
	}
	return parts[0], idle, nil
}

// Greeting is the first message of a client with this id and pool size.
func Greeting(id string, idle int) string {
	return id + "_" + strconv.Itoa(idle)
}

// DecodeRequestHead parses and checks a request head.
func DecodeRequestHead(b []byte) (RequestHead, error) {
	var h RequestHead
	if err := json.Unmarshal(b, &h); err != nil {
		return RequestHead{}, fmt.Errorf("%w: request head: %v", ErrProtocol, err)
	}
	if h.Method == "" || h.URL == "" {
		return RequestHead{}, fmt.Errorf("%w: request head without Method or URL", ErrProtocol)
	}
	return h, nil
}

// DecodeResponseHead parses and checks a response head.
func DecodeResponseHead(b []byte) (ResponseHead, error) {
	var h ResponseHead
	if err := json.Unmarshal(b, &h); err != nil {
		return ResponseHead{}, fmt.Errorf("%w: response head: %v", ErrProtocol, err)
	}
	if h.StatusCode < 100 || h.StatusCode > 999 {
		return ResponseHead{}, fmt.Errorf("%w: response status %d out of range", ErrProtocol, h.StatusCode)
	}
	return h, nil
}

func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
