package config

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"wsp/internal/rules"
)

// LoadServer reads the server configuration at path over the defaults. An
// empty path, or an empty file, gives the defaults. It does not Validate:
// flags may still change the values.
func LoadServer(path string) (Server, error) {
	if path == "" {
		return DefaultServer(), nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Server{}, &Error{Msg: err.Error(), err: err}
	}
	return decodeServer(data, path)
}

// LoadClient reads the client configuration at path over the defaults, as
// LoadServer does. A client left without an id gets a random one.
func LoadClient(path string) (Client, error) {
	if path == "" {
		return DefaultClient(), nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Client{}, &Error{Msg: err.Error(), err: err}
	}
	return decodeClient(data, path)
}

// decodeServer decodes data, read from the file called name, over the defaults.
func decodeServer(data []byte, name string) (Server, error) {
	c := DefaultServer()
	src, err := decode(data, name, &c)
	if err != nil {
		return Server{}, err
	}
	c.src = src
	return c, nil
}

// decodeClient decodes data, read from the file called name, over the defaults.
func decodeClient(data []byte, name string) (Client, error) {
	c := DefaultClient()
	src, err := decode(data, name, &c)
	if err != nil {
		return Client{}, err
	}
	if c.ID == "" {
		c.ID = randomID()
	}
	c.src = src
	return c, nil
}

// source remembers where each key was in the file, so that Validate, which
// runs after flags are applied, can point at the line to fix.
type source struct {
	file  string
	lines map[string]int // key path ("port", "whitelist[0].url") → line
	// loaded is a digest of each top-level value as read from the file: when
	// a flag or the caller has changed a value since, its line no longer
	// explains it and is left out. A digest, so that printing a config with
	// %+v shows no second copy of the secret key.
	loaded map[string][sha256.Size]byte
}

func digest(v reflect.Value) [sha256.Size]byte {
	return sha256.Sum256(fmt.Appendf(nil, "%v", v.Interface()))
}

// line returns the line of key in the file, or 0 when the value of its
// top-level key is no longer the one read from the file.
func (s *source) line(cfg any, key string) int {
	top := key
	if i := strings.IndexAny(key, ".["); i >= 0 {
		top = key[:i]
	}
	want, ok := s.loaded[top]
	if !ok {
		return 0
	}
	f, ok := fieldByKey(reflect.ValueOf(cfg).Elem(), top)
	if !ok || digest(f) != want {
		return 0
	}
	// The most specific recorded key: "whitelist[0].headers.X" may be absent
	// (e.g. for a name Compile rejects), "whitelist[0]" is not.
	for k := key; k != ""; {
		if l, ok := s.lines[k]; ok {
			return l
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

// maxNodes bounds the work done on a document, whose aliases may otherwise
// make a small file expand into a huge one.
const maxNodes = 1 << 18

// decoder walks the YAML node tree itself rather than letting yaml fill the
// struct, to name each unknown key and bad value with its line, and to
// reject what yaml would silently coerce (port: 80.5).
type decoder struct {
	file  string
	lines map[string]int
	nodes int
}

func decode(data []byte, name string, cfg any) (source, error) {
	d := &decoder{file: name, lines: make(map[string]int)}
	top, err := d.document(data)
	if err != nil {
		return source{}, err
	}
	v := reflect.ValueOf(cfg).Elem()
	if top != nil {
		if err := d.fields(top, "", v); err != nil {
			return source{}, err
		}
	}
	src := source{file: name, lines: d.lines, loaded: make(map[string][sha256.Size]byte)}
	for k := range d.lines {
		if strings.ContainsAny(k, ".[") {
			continue
		}
		if f, ok := fieldByKey(v, k); ok {
			src.loaded[k] = digest(f)
		}
	}
	return src, nil
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document parses data and returns its top-level mapping, or nil when the
// document is empty.
func (d *decoder) document(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if err == io.EOF {
			return nil, nil
		}
		return nil, d.syntaxError(err)
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case err == io.EOF:
	case err != nil:
		return nil, d.syntaxError(err)
	default:
		line := next.Line
		if len(next.Content) > 0 {
			line = next.Content[0].Line
		}
		return nil, &Error{File: d.file, Line: line, Msg: "a second YAML document: want one"}
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, &Error{File: d.file, Msg: "not a YAML document"}
	}
	top := doc.Content[0]
	if isNull(top) {
		return nil, nil
	}
	if top.Kind != yaml.MappingNode {
		return nil, &Error{File: d.file, Line: top.Line, Msg: "want a mapping of keys at the top level, got " + kindName(top)}
	}
	return top, nil
}

func (d *decoder) syntaxError(err error) *Error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	e := &Error{File: d.file, Msg: "invalid YAML: " + msg, err: err}
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		if n, err := strconv.Atoi(m[1]); err == nil {
			if yamlParserProblems[m[2]] {
				n++
			}
			e.Line, e.Msg = n, "invalid YAML: "+m[2]
		}
	}
	return e
}

// yamlParserProblems are the messages of yaml's parser errors, whose line
// yaml reports counting from 0 (its scanner errors count from 1).
var yamlParserProblems = map[string]bool{
	"did not find expected <stream-start>":   true,
	"did not find expected <document start>": true,
	"did not find expected node content":     true,
	"did not find expected '-' indicator":    true,
	"did not find expected key":              true,
	"did not find expected ',' or ']'":       true,
	"did not find expected ',' or '}'":       true,
	"found duplicate %YAML directive":        true,
	"found incompatible YAML document":       true,
	"found duplicate %TAG directive":         true,
	"found undefined tag handle":             true,
}

func (d *decoder) errorf(n *yaml.Node, key, format string, args ...any) *Error {
	return &Error{File: d.file, Line: n.Line, Key: key, Msg: fmt.Sprintf(format, args...)}
}

// resolve follows aliases and counts the node against maxNodes.
func (d *decoder) resolve(n *yaml.Node) (*yaml.Node, error) {
	for i := 0; n.Kind == yaml.AliasNode; i++ {
		if n.Alias == nil || i > 100 {
			return nil, &Error{File: d.file, Line: n.Line, Msg: "invalid alias"}
		}
		n = n.Alias
	}
	d.nodes++
	if d.nodes > maxNodes {
		return nil, &Error{File: d.file, Line: n.Line, Msg: "too many values once aliases are expanded"}
	}
	return n, nil
}

// fields decodes mapping n into struct v, whose fields are named by their
// yaml tags. prefix is the key path of n, "" at the top level.
func (d *decoder) fields(n *yaml.Node, prefix string, v reflect.Value) error {
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		keyNode, err := d.resolve(n.Content[i])
		if err != nil {
			return err
		}
		if keyNode.Kind != yaml.ScalarNode {
			return d.errorf(n.Content[i], prefix, "want a key name, got %s", kindName(keyNode))
		}
		name := keyNode.Value
		key := name
		if prefix != "" {
			key = prefix + "." + name
		}
		if first, dup := seen[name]; dup {
			return d.errorf(n.Content[i], prefix, "duplicate key %q (first at line %d)", name, first)
		}
		seen[name] = n.Content[i].Line
		f, ok := fieldByKey(v, name)
		if !ok {
			return d.errorf(n.Content[i], prefix, "unknown key %q", name)
		}
		d.lines[key] = n.Content[i].Line
		if err := d.value(n.Content[i+1], key, f); err != nil {
			return err
		}
	}
	return nil
}

var (
	durationType = reflect.TypeFor[Duration]()
	specsType    = reflect.TypeFor[[]rules.Spec]()
	routesType   = reflect.TypeFor[[]Route]()
	credsType    = reflect.TypeFor[[]ClientCred]()
	stringsType  = reflect.TypeFor[[]string]()
	headersType  = reflect.TypeFor[map[string]string]()
)

// value decodes n into v, the field for key. A null value (`timeout:`)
// leaves the default in place, as an absent key would.
func (d *decoder) value(n *yaml.Node, key string, v reflect.Value) error {
	n, err := d.resolve(n)
	if err != nil {
		return err
	}
	if isNull(n) {
		return nil
	}
	switch v.Type() {
	case durationType:
		if err := v.Addr().Interface().(*Duration).UnmarshalYAML(n); err != nil {
			e, ok := errors.AsType[*Error](err)
			if !ok {
				e = d.errorf(n, key, "%v", err)
			}
			e.File, e.Key = d.file, key
			return e
		}
		return nil
	case specsType:
		return d.structs(n, key, v, "a rule ({method: REGEX, url: REGEX, headers: {NAME: REGEX}})")
	case routesType:
		return d.structs(n, key, v, "a route ({host: REGEX, client: ID})")
	case credsType:
		return d.structs(n, key, v, "a client credential ({id: ID, token: TOKEN})")
	case stringsType:
		if n.Kind != yaml.SequenceNode {
			return d.errorf(n, key, "want a list of strings, got %s", kindName(n))
		}
		list := make([]string, 0, len(n.Content))
		for i, elem := range n.Content {
			k := fmt.Sprintf("%s[%d]", key, i)
			d.lines[k] = elem.Line
			s, err := d.scalar(elem, k)
			if err != nil {
				return err
			}
			list = append(list, s)
		}
		v.Set(reflect.ValueOf(list))
		return nil
	case headersType:
		if strings.HasSuffix(key, "users") {
			return d.stringMap(n, key, v, "user names to passwords", "user")
		}
		return d.stringMap(n, key, v, "header names to regular expressions", "header")
	}
	switch v.Kind() {
	case reflect.String:
		s, err := d.scalar(n, key)
		if err != nil {
			return err
		}
		v.SetString(s)
	case reflect.Int:
		if n.Kind != yaml.ScalarNode {
			return d.errorf(n, key, "want an integer, got %s", kindName(n))
		}
		var i int64
		switch n.ShortTag() {
		case "!!int":
			err = n.Decode(&i)
		case "!!str":
			i, err = strconv.ParseInt(n.Value, 10, 64)
		default:
			err = errors.New("not an integer")
		}
		if err != nil || v.OverflowInt(i) {
			return d.errorf(n, key, "invalid integer %q", n.Value)
		}
		v.SetInt(i)
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return d.errorf(n, key, "want a mapping, got %s", kindName(n))
		}
		return d.fields(n, key, v)
	case reflect.Bool:
		var b bool
		if n.Kind != yaml.ScalarNode || n.Decode(&b) != nil {
			return d.errorf(n, key, "invalid value %q: want true or false", n.Value)
		}
		v.SetBool(b)
	default:
		// Only reachable if a field of a type this decoder does not know is
		// added to Server or Client; the fuzz tests would find it.
		return d.errorf(n, key, "cannot decode into %s", v.Type())
	}
	return nil
}

// scalar returns the text of a scalar as written, so `secretkey: 0123` keeps
// its leading zero and `id: 1e3` stays "1e3".
func (d *decoder) scalar(n *yaml.Node, key string) (string, error) {
	n, err := d.resolve(n)
	if err != nil {
		return "", err
	}
	if n.Kind != yaml.ScalarNode {
		return "", d.errorf(n, key, "want a string, got %s", kindName(n))
	}
	if isNull(n) {
		return "", nil
	}
	return n.Value, nil
}

// structs decodes a list of mappings into v, a slice of structs whose
// fields are keys like the top level's; what describes one element for
// errors.
func (d *decoder) structs(n *yaml.Node, key string, v reflect.Value, what string) error {
	if n.Kind != yaml.SequenceNode {
		return d.errorf(n, key, "want a list, each element %s, got %s", what, kindName(n))
	}
	list := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, elem := range n.Content {
		k := fmt.Sprintf("%s[%d]", key, i)
		d.lines[k] = elem.Line
		r, err := d.resolve(elem)
		if err != nil {
			return err
		}
		if r.Kind != yaml.MappingNode {
			return d.errorf(elem, k, "want %s, got %s", what, kindName(r))
		}
		if err := d.fields(r, k, list.Index(i)); err != nil {
			return err
		}
	}
	v.Set(list)
	return nil
}

// stringMap decodes a mapping of strings; what and name describe its keys
// and values for errors.
func (d *decoder) stringMap(n *yaml.Node, key string, v reflect.Value, what, name string) error {
	if n.Kind != yaml.MappingNode {
		return d.errorf(n, key, "want a mapping of %s, got %s", what, kindName(n))
	}
	m := make(map[string]string, len(n.Content)/2)
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, err := d.scalar(n.Content[i], key)
		if err != nil {
			return err
		}
		if first, dup := seen[k]; dup {
			return d.errorf(n.Content[i], key, "duplicate %s %q (first at line %d)", name, k, first)
		}
		seen[k] = n.Content[i].Line
		path := key + "." + k
		d.lines[path] = n.Content[i].Line
		if m[k], err = d.scalar(n.Content[i+1], path); err != nil {
			return err
		}
	}
	v.Set(reflect.ValueOf(m))
	return nil
}

// fieldByKey returns the field of struct v whose yaml tag is key.
func fieldByKey(v reflect.Value, key string) (reflect.Value, bool) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		tag, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if tag != "" && tag != "-" && tag == key {
			return v.Field(i), true
		}
	}
	return reflect.Value{}, false
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return fmt.Sprintf("%q", n.Value)
	}
	return "nothing"
}
