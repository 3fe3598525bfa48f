-- The `cex.rest_fields` filter: a REST request's JSON body may only name fields
-- its gRPC request message has. It runs after the transcoder (so :path is the gRPC
-- method) and reads the key paths `cex.rest` listed before the transcoder dropped
-- what it did not know. An unknown field is INVALID_ARGUMENT, HTTP 400, with a
-- BadRequest naming it (EDGE_UNKNOWN_FIELD), and the call never reaches the service.
--
-- The renderer (cex_stack/envoy.py) puts the schema before this code, from the
-- same descriptor set the transcoder uses:
--   METHODS["/pkg.Service/Method"] = "pkg.RequestMessage"  (methods with a JSON body)
--   MESSAGES["pkg.Message"][json or proto field name] = true (a leaf: scalar, enum,
--     or a well-known type written as a JSON scalar), "*" (anything below: a map,
--     Struct, Value, ListValue, Any) or the field's message type name.

local function unknown(message, path)
  local shape = MESSAGES[message]
  for segment in path:gsub("%[%d+%]", ""):gmatch("[^.]+") do
    if shape == nil then
      return true -- below a leaf
    end
    local field = shape[segment]
    if field == nil then
      return true
    end
    if field == "*" then
      return false
    end
    shape = field ~= true and MESSAGES[field] or nil
  end
  return false
end

local function json_string(text)
  return '"' .. text:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

function envoy_on_request(handle)
  local rest = handle:streamInfo():dynamicMetadata():get("cex.rest")
  if rest == nil or rest["keys"] == nil then
    return
  end
  local message = METHODS[handle:headers():get(":path")]
  if message == nil then
    return
  end
  for path in rest["keys"]:gmatch("[^\n]+") do
    if unknown(message, path) then
      local text = "unknown field " .. path .. " in " .. message
      local status = '{"code":3,"message":' .. json_string(text)
        .. ',"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",'
        .. '"reason":"EDGE_UNKNOWN_FIELD","domain":"envoy","metadata":{"field":'
        .. json_string(path) .. "}},"
        .. '{"@type":"type.googleapis.com/google.rpc.BadRequest","field_violations":'
        .. '[{"field":' .. json_string(path) .. ',"description":'
        .. json_string("no such field in " .. message) .. "}]}]}"
      handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, status)
      return
    end
  end
end
