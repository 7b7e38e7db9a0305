package tunnel

import (
	"net/http"
	"net/textproto"
	"strings"
)

// UpgradeType is the protocol a request (or a 101 answer) asks to switch to,
// as its Connection and Upgrade headers say, or "". On a stream, such a
// request keeps both headers, and a 101 answer turns the stream into a byte
// pipe that is never reused.
func UpgradeType(h http.Header) string {
	for _, v := range h["Connection"] {
		for _, tok := range strings.Split(v, ",") {
			if strings.EqualFold(textproto.TrimString(tok), "upgrade") {
				return h.Get("Upgrade")
			}
		}
	}
	return ""
}
