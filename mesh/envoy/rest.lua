-- The `cex.rest` filter: the REST side of the edge, first in the chain.
--
-- On the way in, for a request that is not gRPC and carries a body, it lists the
-- object keys of the JSON body as paths ("orders[0].price") in the dynamic
-- metadata `cex.rest/keys`, one per line, the first occurrence of each path
-- (array indices aside). The transcoder drops JSON fields its message does not
-- have, silently; `cex.rest_fields` (after the transcoder, where the gRPC method
-- is known) refuses them by these paths. A body that is not JSON (RFC 8259) is
-- refused here: the transcoder's parser also takes single quotes, bare keys and
-- trailing commas, and a key this scanner could not see would not be checked.
--
-- On the way out, Envoy's own plain-text 400 to a REST request becomes a
-- google.rpc.Status in JSON with a BadRequest field violation naming the field
-- Envoy named (else "body"): the transcoder's "price: invalid value 100 for type
-- TYPE_STRING", an unknown enum name or a syntax error (EDGE_INVALID_JSON), an
-- unknown query parameter (EDGE_UNKNOWN_FIELD), a body field contradicting the
-- path's (EDGE_FIELD_CONFLICT).
-- Envoy's other refusals are shaped by local_reply_config; a service's errors
-- come back as JSON already (the transcoder's convert_grpc_status).

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

-- INVALID_ARGUMENT as a google.rpc.Status in JSON, with one field violation.
local function invalid_json(reason, text, field)
  return '{"code":3,"message":' .. json_string(text)
    .. ',"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",'
    .. '"reason":"' .. reason .. '","domain":"envoy"},'
    .. '{"@type":"type.googleapis.com/google.rpc.BadRequest","field_violations":'
    .. '[{"field":' .. json_string(field) .. ',"description":' .. json_string(text) .. "}]}]}"
end

-- The key paths of a JSON text, or nil and the byte where it stops being JSON
-- (values are only delimited, not checked: the transcoder reads them).
-- Keys are taken as written (escapes undecoded); '.', '[' and ']' in a key become
-- '?', so a key can never pose as a path through a real field.
local function key_paths(text)
  local paths, seen = {}, {}
  local pos = 1

  local function skip_space()
    pos = text:find("[^ \t\r\n]", pos) or (#text + 1)
  end

  local function read_string()
    -- at the opening quote; returns the raw contents
    local start = pos + 1
    local i = start
    while true do
      local stop = text:find('["\\]', i)
      if not stop then return nil end
      if text:sub(stop, stop) == '"' then
        pos = stop + 1
        return text:sub(start, stop - 1)
      end
      i = stop + 2
    end
  end

  local value

  local function object(path, shape, depth)
    pos = pos + 1
    skip_space()
    if text:sub(pos, pos) == "}" then pos = pos + 1; return true end
    while true do
      skip_space()
      if text:sub(pos, pos) ~= '"' then return nil end
      local key = read_string()
      if not key then return nil end
      key = key:gsub("[%.%[%]\n]", "?")
      local full = path == "" and key or (path .. "." .. key)
      local general = shape == "" and key or (shape .. "." .. key)
      if not seen[general] then
        seen[general] = true
        paths[#paths + 1] = full
      end
      skip_space()
      if text:sub(pos, pos) ~= ":" then return nil end
      pos = pos + 1
      if not value(full, general, depth) then return nil end
      skip_space()
      local c = text:sub(pos, pos)
      pos = pos + 1
      if c == "}" then return true end
      if c ~= "," then return nil end
    end
  end

  local function array(path, shape, depth)
    pos = pos + 1
    skip_space()
    if text:sub(pos, pos) == "]" then pos = pos + 1; return true end
    local index = 0
    while true do
      if not value(path .. "[" .. index .. "]", shape .. "[]", depth) then return nil end
      skip_space()
      local c = text:sub(pos, pos)
      pos = pos + 1
      if c == "]" then return true end
      if c ~= "," then return nil end
      index = index + 1
    end
  end

  value = function(path, shape, depth)
    if depth > 64 then return nil end
    skip_space()
    local c = text:sub(pos, pos)
    if c == "{" then return object(path, shape, depth + 1) end
    if c == "[" then return array(path, shape, depth + 1) end
    if c == '"' then return read_string() ~= nil end
    local stop = text:find("[,}%]%s]", pos) or (#text + 1)
    if stop == pos then return nil end
    pos = stop
    return true
  end

  if not value("", "", 0) then return nil, pos end
  skip_space()
  if pos <= #text then return nil, pos end
  return paths
end

function envoy_on_request(handle)
  local content_type = handle:headers():get("content-type") or ""
  if content_type:find("^application/grpc") then
    return -- gRPC and gRPC-Web: not ours
  end
  handle:streamInfo():dynamicMetadata():set("cex.rest", "rest", true)
  local body = handle:body() -- waits for the whole body: objects taken before are stale
  if body == nil or body:length() == 0 then
    return
  end
  local paths, stop = key_paths(body:getBytes(0, body:length()))
  if paths == nil then
    local text = "the body is not JSON (RFC 8259) or nests deeper than 64: stopped at byte "
      .. stop
    handle:respond({ [":status"] = "400", ["content-type"] = "application/json" },
      invalid_json("EDGE_INVALID_JSON", text, "body"))
  elseif #paths > 0 then
    handle:streamInfo():dynamicMetadata():set("cex.rest", "keys", table.concat(paths, "\n"))
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(":status") ~= "400" then
    return
  end
  if not (headers:get("content-type") or ""):find("^text/plain") then
    return -- a JSON Status already (a service's, or cex.rest_fields')
  end
  local rest = handle:streamInfo():dynamicMetadata():get("cex.rest")
  if rest == nil or not rest["rest"] then
    return
  end
  headers:replace("content-type", "application/json")
  local body = handle:body() -- waits for the whole body: `headers` is stale after this
  local text = body and body:getBytes(0, body:length()) or ""
  text = text:gsub("%s+$", "")
  local reason, field = "EDGE_INVALID_JSON", text:match("^([%w_][%w_%.%[%]]*): ")
  local unknown = text:match('^Could not find field "([^"]+)"') -- a query parameter
  local conflict = text:match("of the field ([%w_%.]+) is conflicting") -- path vs body
  if unknown then
    reason, field = "EDGE_UNKNOWN_FIELD", unknown
  elseif conflict then
    reason, field = "EDGE_FIELD_CONFLICT", conflict
  end
  local status = invalid_json(reason, text, field or "body")
  if body then
    body:setBytes(status) -- sets content-length too
  end
end
